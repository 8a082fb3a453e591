; ferry test guest ("testvm"): a boot sector plus a few 64-bit sectors.
;
; Built by the VM driver with `nasm -f bin`; the driver patches the parameter
; block (below) into each instance's disk. Not a product feature: users run
; real guests. It exists because on the nested "PVM" KVM of the test machines
; guest ring-0 and real-mode code is emulated (tens of microseconds per
; instruction) while ring-3 code runs natively, so the guest does its work in
; ring 3 and enters ring 0 only to do port I/O.
;
; Boot: SeaBIOS loads the boot sector at 0x7c00 (real mode). It reads the
; 64-bit sectors to 0x7e00 with INT 13h, builds identity-mapped page tables
; (2 MiB pages, user-accessible), and switches straight from real mode to long
; mode. Ring 0 loads a GDT, a TSS and an IDT, calibrates the TSC against PIT
; channel 2 (a 50 ms one-shot polled on port 0x61) and drops to ring 3
; (iretq, IF=0, IOPL=3).
;
; Ring 3 loops forever:
;   - write one dword (low 32 bits of COUNTER) per 4 KiB page over
;     [dirty_start_mib, dirty_start_mib + dirty_mib) MiB;
;   - after each full pass increment the u64 COUNTER (so COUNTER counts
;     passes; with dirty_mib = 0 it counts loop iterations);
;   - every 1 MiB of a pass and at its end: if interval_ms elapsed by the
;     TSC, print "counter N\n" (N = COUNTER in decimal) on COM1.
; Port I/O from ring 3 with IOPL=3 raises #GP under PVM anyway (and `int n`
; raises #UD), so the ring-0 #GP handler emulates the one I/O instruction the
; ring-3 code uses, `rep outsb` (skips it and returns); on hardware that honours
; IOPL it runs natively. Any other CPU exception prints
; "testvm: exception VV RRRRRRRRRRRRRRRR" (vector, then rip or error code) and
; halts, instead of a silent reboot loop.
; COUNTER lives in guest RAM, so a VM restored from saved state continues
; counting from where it was; only a cold boot starts it at 0.
;
; Guest-physical memory map (fixed; the driver reads COUNTER):
;   0x2000  IDT (32 gates)
;   0x3000  TSS (104 bytes)
;   0x5000  ring-0 stack top (RSP0)
;   0x7000  ring-3 stack top
;   0x7c00  boot sector (GDT and parameter block inside it)
;   0x7e00  64-bit code (STAGE2_SECTORS sectors, must end below 0x9000)
;   0x9000  COUNTER   u64  passes over the dirty range
;   0x9008  TSC_50MS  u64  calibrated TSC ticks per 50 ms
;   0x9040  line buffer for "counter N\n"
;   0x10000 PML4, 0x11000 PDPT, 0x12000-0x15fff four page directories
;
; Parameter block at byte offset 0x1c0 of the disk (patched by the driver):
;   +0  u32 magic 0x4d525046 ("FPRM")   +4 u16 version (1)   +6 u16 size (24)
;   +8  u32 map_2m          number of 2 MiB pages to identity-map (1..2048)
;   +12 u32 dirty_start_mib start of the dirtied range
;   +16 u32 dirty_mib       size of the dirtied range
;   +20 u32 interval_ms     print interval
; All little-endian.

bits 16
org 0x7c00

IDT         equ 0x2000
TSS         equ 0x3000
KSTACK      equ 0x5000
USTACK      equ 0x7000
COUNTER     equ 0x9000
TSC_50MS    equ 0x9008
LINEBUF     equ 0x9040
PML4        equ 0x10000
PDPT        equ 0x11000
PD          equ 0x12000
COM1        equ 0x3f8
PIT_50MS    equ 59659           ; 1193182 Hz * 0.05 s
STAGE2_SECTORS equ 3
NVEC        equ 32

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, USTACK
    jmp 0:.cs0
.cs0:
    mov ax, 0x0200 | STAGE2_SECTORS ; INT 13h read (CHS); DL = boot drive
    mov cx, 0x0002              ; cylinder 0, sector 2
    xor dh, dh                  ; head 0
    mov bx, 0x7e00              ; ES:BX
    int 0x13
    jc $                        ; disk error: hang

    in al, 0x92                 ; fast A20
    or al, 2
    and al, 0xfe
    out 0x92, al

    mov ax, PML4 >> 4           ; page tables through ES
    mov es, ax
    mov dword [es:0], PDPT | 7
    mov dword [es:4], 0
    mov di, PDPT - PML4
    mov eax, PD | 7
    mov cx, 4
.pdpt:
    mov [es:di], eax
    mov dword [es:di+4], 0
    add eax, 0x1000
    add di, 8
    loop .pdpt
    mov cx, [param_map2m]
    mov di, PD - PML4
    mov eax, 0x87               ; present, writable, user, 2 MiB page
.pd:
    mov [es:di], eax
    mov dword [es:di+4], 0
    add eax, 0x200000
    add di, 8
    loop .pd

    lgdt [gdtr]
    mov eax, 0x20               ; CR4.PAE
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xc0000080         ; EFER.LME
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001          ; PG | PE
    mov cr0, eax
    jmp 0x08:long_mode

align 8
gdt:
    dq 0
    dq 0x00209a0000000000       ; 0x08 ring-0 code, 64-bit
    dq 0x0000920000000000       ; 0x10 ring-0 data
    dq 0x0000f20000000000       ; 0x18 ring-3 data
    dq 0x0020fa0000000000       ; 0x20 ring-3 code, 64-bit
    dq 0x0000890000000067 | (TSS << 16) ; 0x28 TSS (limit 103)
    dq 0
gdt_end:
gdtr:
    dw gdt_end - gdt - 1
    dd gdt

    times 0x1c0 - ($ - $$) db 0
params:
    dd 0x4d525046               ; "FPRM"
    dw 1                        ; version
    dw 24                       ; size
param_map2m:            dd 10
param_dirty_start_mib:  dd 4
param_dirty_mib:        dd 16
param_interval_ms:      dd 100

    times 510 - ($ - $$) db 0
    dw 0xaa55

; ---- 64-bit code, loaded to 0x7e00 ----
bits 64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, KSTACK
    mov qword [TSS + 4], KSTACK ; RSP0
    mov word [TSS + 0x66], 104  ; no I/O bitmap
    mov ax, 0x28
    ltr ax

    mov rdi, IDT                ; gate i -> exc_stubs + 16 * i
    mov rsi, exc_stubs
    mov rdx, 0x00008e0000080000 ; selector 0x08, present interrupt gate, DPL 0
    xor ecx, ecx
.idt:
    mov rax, rsi
    and eax, 0xffff
    or rax, rdx
    mov rbx, rsi
    shr rbx, 16
    shl rbx, 48
    or rax, rbx
    mov [rdi], rax
    mov qword [rdi + 8], 0
    add rdi, 16
    add rsi, 16
    inc ecx
    cmp ecx, NVEC
    jb .idt
    lidt [idtr]

    in al, 0x61                 ; calibrate: PIT ch2 gate on, speaker off
    and al, 0xfc
    or al, 1
    out 0x61, al
    mov al, 0xb0                ; ch2, lo/hi byte, mode 0
    out 0x43, al
    mov al, PIT_50MS & 0xff
    out 0x42, al
    mov al, PIT_50MS >> 8
    out 0x42, al
    rdtsc
    mov ebx, eax
    mov ebp, edx
.wait:
    in al, 0x61
    test al, 0x20
    jz .wait
    rdtsc
    shl rdx, 32
    or rax, rdx
    shl rbp, 32
    or rbx, rbp
    sub rax, rbx
    mov [TSC_50MS], rax
    xor eax, eax
    mov [COUNTER], rax

    push 0x18 | 3               ; SS
    push USTACK                 ; RSP
    push 0x3002                 ; RFLAGS: IOPL=3, IF=0
    push 0x20 | 3               ; CS
    push user_main              ; RIP
    iretq

gp_handler:                     ; #GP: emulate ring-3 `rep outsb` (F3 6E)
    push rax
    mov rax, [rsp + 16]         ; rip (above saved rax and the error code)
    cmp word [rax], 0x6ef3
    jne .fault
    rep outsb                   ; with the interrupted code's rsi, rcx, dx
    add qword [rsp + 16], 2
    pop rax
    add rsp, 8                  ; error code
    iretq
.fault:
    pop rax
    push qword 13
    jmp exc_common

exc_common:                     ; [rsp] = vector, then (error code,) rip
    mov rsi, exc_msg
    mov ecx, exc_msg_len
    mov dx, COM1
    rep outsb
    mov rax, [rsp]
    mov cl, 2
    call hex
    mov rax, [rsp + 8]          ; rip (or error code for vectors that push one)
    mov cl, 16
    call hex
    mov al, 10
    out dx, al
.halt:
    cli
    hlt
    jmp .halt

hex:                            ; print low cl nibbles of rax as hex + space
    movzx ecx, cl
    mov rbx, rax
    shl ecx, 2
    ror rbx, cl
    shr ecx, 2
.h:
    rol rbx, 4
    mov al, bl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .o
    add al, 7
.o:
    out dx, al
    loop .h
    mov al, ' '
    out dx, al
    ret

exc_msg: db 10, "testvm: exception "
exc_msg_len equ $ - exc_msg

idtr:
    dw NVEC * 16 - 1
    dq IDT

align 16
exc_stubs:
%assign i 0
%rep 32
%if i == 13
    jmp gp_handler
%else
    push qword i
    jmp exc_common
%endif
    align 16
%assign i i+1
%endrep

; ---- ring 3 ----
user_main:
    mov rax, [TSC_50MS]
    test rax, rax
    jnz .cal
    inc rax
.cal:
    mov ecx, [param_interval_ms]
    mul rcx
    mov ecx, 50
    div rcx
    mov r13, rax                ; r13 = TSC ticks per interval
    mov ebx, [param_dirty_start_mib]
    shl rbx, 20                 ; rbx = start of the dirty range
    mov r12d, [param_dirty_mib]
    shl r12, 20
    add r12, rbx                ; r12 = end
    call print_counter
    call rdtsc64
    mov r14, rax                ; r14 = TSC at the last print
.pass:
    mov rdi, rbx
    mov eax, [COUNTER]
.page:
    cmp rdi, r12
    jae .done
    mov [rdi], eax
    add rdi, 4096
    test edi, 0xfffff
    jnz .page
    call tick
    jmp .page
.done:
    inc qword [COUNTER]
    call tick
    jmp .pass

rdtsc64:                        ; rax = TSC (clobbers rdx)
    rdtsc
    shl rdx, 32
    or rax, rdx
    ret

tick:                           ; print if an interval elapsed; keeps rax, rdi
    push rax
    call rdtsc64
    mov rdx, rax
    sub rdx, r14                ; wraps (prints) if the TSC went backwards
    cmp rdx, r13
    jb .no
    mov r14, rax
    call print_counter
.no:
    pop rax
    ret

print_counter:                  ; "counter N\n" on COM1; keeps rdi
    push rdi
    mov rax, [COUNTER]
    mov rdi, LINEBUF + 32
    mov byte [rdi], 10
    mov ecx, 10
.d:
    xor edx, edx
    div rcx
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz .d
    sub rdi, 8
    mov rax, "counter "
    mov [rdi], rax
    mov rsi, rdi
    mov rcx, LINEBUF + 33
    sub rcx, rdi
    mov dx, COM1
    rep outsb
    pop rdi
    ret

    times STAGE2_SECTORS * 512 + 512 - ($ - $$) db 0
