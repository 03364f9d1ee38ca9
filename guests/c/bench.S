/* The minimal benchmark guest: PVH entry, print one line on COM1, then
 * triple-fault (an empty IDT and ud2) so that any VMM run with -no-reboot
 * exits. Runs the same on moat and on QEMU microvm. */
	.section .note.Xen, "a"
	.p2align 2
	.long 4, 4, 18
	.asciz "Xen"
	.long pvh_start

	.section .text.head, "ax"
	.code32
	.globl linux64_start
linux64_start:
pvh_start:
	movl $msg, %esi
	movw $0x3f8, %dx
1:	lodsb
	testb %al, %al
	jz 2f
	outb %al, %dx
	jmp 1b
2:	lidt null_idt
	ud2

	.section .rodata
msg:	.asciz "moat bench guest: hello from COM1\r\n"
	.p2align 3
null_idt:
	.word 0
	.quad 0
