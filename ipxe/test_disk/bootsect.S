# BMI test disk boot sector (16-bit real mode, loaded by the BIOS or iPXE at 0x7c00).
#
# Disk layout (512-byte sectors):
#   LBA 0  this boot sector (+ a partition table entry written by test_disk.py)
#   LBA 1  identity label: up to 16 printable ASCII bytes, NUL padded
#   LBA 2  boot counter: little-endian 16-bit word in the first two bytes
#
# On boot: read LBA 1-2, increment the counter, write LBA 2 back (so a second boot of
# the same disk shows the next number: proves writes reach the disk, e.g. through
# iPXE's sanboot int 13h hook), print "BMI-BOOT-MARKER id=<label> boot=<n>" to COM1
# and halt. On a disk error it prints "BMI-BOOT-ERROR op=<r|w> ah=<status>" instead.
#
# Build: as --32 -o bootsect.o bootsect.S
#        ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o bootsect.bin bootsect.o

    .code16
    .text
    .globl _start

    .set COM1, 0x3f8
    .set BUF, 0x7e00            # LBA 1 lands here, LBA 2 at BUF + 512
    .set COUNTER, BUF + 512
    .set LABEL_LEN, 16

_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    sti
    ljmp $0, $start             # normalise CS:IP to 0000:7cxx
start:
    cld
    movb %dl, drive             # the BIOS / iPXE passes the boot drive number in DL

    call uart_init

    # Extended read (AH=42h) of LBA 1..2; LBA addressing needs no disk geometry.
    movb $0x42, %ah
    movw $2, dap_count
    movw $1, dap_lba
    call disk_io
    jc read_failed

    incw COUNTER

    # Extended write (AH=43h, AL=0: no verify) of LBA 2 only.
    movw $0x4300, %ax
    movw $1, dap_count
    movw $2, dap_lba
    movw $COUNTER, dap_buf
    call disk_io
    jc write_failed

    movw $msg_marker, %si
    call puts
    movw $BUF, %si              # the label: stop at NUL or after 16 bytes
    movw $LABEL_LEN, %cx
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    loop 1b
2:  movw $msg_boot, %si
    call puts
    movw COUNTER, %ax
    call put_decimal
    jmp done

read_failed:
    movb $'r', %bl
    jmp disk_error
write_failed:
    movb $'w', %bl
disk_error:
    pushw %ax                   # AH = BIOS status code
    movw $msg_error, %si
    call puts
    movb %bl, %al
    call putc
    movw $msg_ah, %si
    call puts
    popw %ax
    movb %ah, %al
    xorb %ah, %ah
    call put_decimal

done:
    movw $msg_crlf, %si
    call puts
halt:
    cli
    hlt
    jmp halt

# int 13h with the DAP; AH (and AL) set by the caller. CF set on error, status in AH.
disk_io:
    movb drive, %dl
    movw $dap, %si
    int $0x13
    ret

# 115200 8N1, FIFO on: the serial console QEMU writes to a file.
uart_init:
    movw $COM1 + 1, %dx
    xorb %al, %al               # no interrupts
    outb %al, %dx
    movw $COM1 + 3, %dx
    movb $0x80, %al             # DLAB on
    outb %al, %dx
    movw $COM1, %dx
    movb $1, %al                # divisor 1 = 115200 baud
    outb %al, %dx
    movw $COM1 + 1, %dx
    xorb %al, %al
    outb %al, %dx
    movw $COM1 + 3, %dx
    movb $0x03, %al             # 8N1, DLAB off
    outb %al, %dx
    movw $COM1 + 2, %dx
    movb $0xc7, %al             # enable and clear FIFOs
    outb %al, %dx
    movw $COM1 + 4, %dx
    movb $0x03, %al             # DTR, RTS
    outb %al, %dx
    ret

# Write AL to COM1 once the transmit holding register is empty.
putc:
    pushw %dx
    pushw %ax
    movw $COM1 + 5, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    popw %ax
    movw $COM1, %dx
    outb %al, %dx
    popw %dx
    ret

# Print the NUL-terminated string at DS:SI.
puts:
    lodsb
    testb %al, %al
    jz 1f
    call putc
    jmp puts
1:  ret

# Print AX as an unsigned decimal number.
put_decimal:
    movw $10, %bx
    xorw %cx, %cx
1:  xorw %dx, %dx
    divw %bx
    pushw %dx
    incw %cx
    testw %ax, %ax
    jnz 1b
2:  popw %ax
    addb $'0', %al
    call putc
    loop 2b
    ret

msg_marker: .asciz "BMI-BOOT-MARKER id="
msg_boot:   .asciz " boot="
msg_error:  .asciz "BMI-BOOT-ERROR op="
msg_ah:     .asciz " ah="
msg_crlf:   .asciz "\r\n"

drive: .byte 0x80

# Disk address packet for AH=42h/43h.
    .balign 4
dap:       .byte 16, 0
dap_count: .word 0
dap_buf:   .word BUF, 0         # offset, segment
dap_lba:   .word 0, 0, 0, 0

    # The partition table (filled in per disk by bmi_server/devenv/test_disk.py: iPXE
    # guesses the CHS geometry from it); .org fails the build if the code grows into it.
    .org 446
    .fill 64, 1, 0
    .byte 0x55, 0xaa
