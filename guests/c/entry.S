/* Entry points of moat's test guests.
 *   0x100000  linux32_start: Linux 32-bit boot protocol (ESI = boot_params)
 *   0x100200  linux64_start: Linux 64-bit boot protocol (RSI = boot_params)
 *   pvh_start: PVH entry (EBX = hvm_start_info), named by the Xen ELF note
 * All of them end in long mode with our own GDT and page tables, calling
 *   void guest_main(uint64_t info, uint32_t kind)   kind: 1 = Linux, 2 = PVH
 * ap_trampoline (copied to 0x8000 by the BSP) brings application processors
 * from real mode to long mode and calls ap_main(index).
 */
#define KIND_LINUX 1
#define KIND_PVH 2

	.section .note.Xen, "a"
	.p2align 2
	.long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.section .text.head, "ax"
	.code32
	.globl linux32_start
linux32_start:
	movl %esi, %edi
	movl $KIND_LINUX, %ebp
	jmp common32

	.org 0x200
	.code64
	.globl linux64_start
linux64_start:
	cli
	movq %rsi, %rdi
	movl $KIND_LINUX, %esi
	jmp common64

	.text
	.code32
	.globl pvh_start
pvh_start:
	movl %ebx, %edi
	movl $KIND_PVH, %ebp
	/* fall through */
common32:
	/* Identity-map 4 GiB with 2 MiB pages. */
	movl $pdpt, %eax
	orl $3, %eax
	movl %eax, pml4
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $12, %eax
	addl $pd, %eax
	orl $3, %eax
	movl %eax, pdpt(,%ecx,8)
	incl %ecx
	cmpl $4, %ecx
	jne 1b
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax
	movl %eax, pd(,%ecx,8)
	movl %ecx, %eax
	shrl $11, %eax
	movl %eax, pd+4(,%ecx,8)
	incl %ecx
	cmpl $2048, %ecx
	jne 2b
	movb $1, tables_ready
to_long:
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $0xc0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	lgdt gdt_ptr
	ljmp $0x08, $long_entry

	.code64
long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	cmpl $0, %ebp
	je ap_long
	movl %edi, %edi
	movl %ebp, %esi
common64:
	lgdt gdt_ptr
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	leaq stack_top(%rip), %rsp
	call guest_main
3:	cli
	hlt
	jmp 3b

ap_long:
	movl $1, %eax
	lock xaddl %eax, ap_next
	movl %eax, %edi
	incl %eax
	shlq $12, %rax
	leaq ap_stacks(%rip), %rsp
	addq %rax, %rsp
	call ap_main
4:	cli
	hlt
	jmp 4b

	.code32
ap_start32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	xorl %ebp, %ebp
	jmp to_long

	/* Real-mode trampoline: position independent, copied to 0x8000. */
	.code16
	.globl ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	lgdtl 0x8000 + (tramp_gdt_ptr - ap_trampoline)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x18, $ap_start32
	.p2align 2
tramp_gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
ap_trampoline_end:

	.data
	.p2align 3
gdt:
	.quad 0
	.quad 0x00af9a000000ffff   /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff   /* 0x10: data */
	.quad 0x00cf9a000000ffff   /* 0x18: 32-bit code */
gdt_end:
	.p2align 2
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt
	.globl ap_next, tables_ready
ap_next:
	.long 0
tables_ready:
	.byte 0

	.bss
	.p2align 12
	.globl pml4, pdpt, pd
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
	.skip 16384
stack_top:
	.globl ap_stacks
ap_stacks:
	.skip 64 * 4096
