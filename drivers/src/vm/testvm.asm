; ferry test guest ("testvm"): a boot sector plus one more sector.
;
; SeaBIOS loads the boot sector at 0x7c00 in real mode. It reads sector 2
; (64-bit code) to 0x7e00 with INT 13h, builds identity-mapped page
; tables (2 MiB pages, user-accessible), switches straight from real mode to
; long mode, loads a GDT and a TSS, and drops to ring 3 with IOPL=3 (port I/O
; allowed) and IF=0. Everything after that runs in ring 3, because under the
; nested KVM of the test machines guest ring-0 code is emulated ~1000x slower.
;
; Ring 3: zero the counter, calibrate the TSC against PIT channel 2 (50 ms
; one-shot, polled on port 0x61), print "counter 0", then loop forever:
;   - write one dword (low 32 bits of the counter) per 4 KiB page over
;     [dirty_start_mib, dirty_start_mib + dirty_mib) MiB,
;   - after each full pass increment the u64 COUNTER,
;   - every 1 MiB of the pass and at its end: if interval_ms elapsed (TSC),
;     print "counter N\n" (decimal) on COM1 (port 0x3f8).
; The counter counts passes; it lives in guest RAM so a restored VM continues.
;
; Guest-physical memory map (fixed; the driver relies on COUNTER):
;   0x5000  ring-0 stack top (RSP0 in the TSS)
;   0x6000  TSS (104 bytes)
;   0x7000  ring-3 stack top
;   0x7c00  boot sector (GDT and parameter block inside it)
;   0x7e00  sector 2: 64-bit code
;   0x8000  COUNTER   u64  passes over the dirty range
;   0x8008  TSC_50MS  u64  calibrated TSC ticks per 50 ms
;   0x8040  scratch for decimal conversion
;   0x10000 PML4, 0x11000 PDPT, 0x12000-0x15fff four page directories
;
; Parameter block at byte offset 0x1c0 of the disk (patched by the driver):
;   +0  u32 magic 0x4d525046 ("FPRM")   +4 u16 version (1)   +6 u16 size (24)
;   +8  u32 map_2m     number of 2 MiB pages to identity-map (1..2048)
;   +12 u32 dirty_start_mib
;   +16 u32 dirty_mib
;   +20 u32 interval_ms
; All little-endian.

bits 16
org 0x7c00

COUNTER     equ 0x8000
TSC_50MS    equ 0x8008
NUMBUF      equ 0x8040
KSTACK      equ 0x5000
TSS         equ 0x6000
USTACK      equ 0x7000
PML4        equ 0x10000
PDPT        equ 0x11000
PD          equ 0x12000
COM1        equ 0x3f8
PIT_50MS    equ 59659          ; 1193182 Hz * 0.05 s
STAGE2_SECTORS equ 1

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, USTACK
    jmp 0:.cs0
.cs0:
    in al, 0x92                 ; fast A20
    or al, 2
    and al, 0xfe
    out 0x92, al

    mov ax, 0x0200 | STAGE2_SECTORS ; INT 13h read (CHS), DL = boot drive from BIOS
    mov cx, 0x0002              ; cylinder 0, sector 2
    xor dh, dh                  ; head 0
    mov bx, 0x7e00              ; ES:BX = 0:0x7e00
    push ds
    pop es
    int 0x13
    jc $                        ; disk error: hang (no output)

    mov ax, PML4 >> 4           ; page tables via ES (real mode)
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
    dq 0x0000890000000067 | (TSS << 16) ; 0x28 TSS (base TSS, limit 103)
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

; ---- sector 2 onwards: 64-bit code, loaded to 0x7e00 ----
bits 64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, KSTACK
    mov qword [TSS + 4], KSTACK ; RSP0
    mov word [TSS + 0x66], 104  ; I/O map base past the limit
    mov ax, 0x28
    ltr ax
    push 0x18 | 3               ; SS
    push USTACK                 ; RSP
    push 0x3002                 ; RFLAGS: IOPL=3, IF=0
    push 0x20 | 3               ; CS
    push user_main              ; RIP
    iretq

; ---- ring 3 ----
user_main:
    xor eax, eax
    mov [COUNTER], rax
    in al, 0x61                 ; PIT ch2 gate on, speaker off
    and al, 0xfc
    or al, 1
    out 0x61, al
    mov al, 0xb0                ; ch2, lo/hi, mode 0
    out 0x43, al
    mov al, PIT_50MS & 0xff
    out 0x42, al
    mov al, PIT_50MS >> 8
    out 0x42, al
    call rdtsc64
    mov rbx, rax
.wait:
    in al, 0x61
    test al, 0x20
    jz .wait
    call rdtsc64
    sub rax, rbx
    jnz .ok
    inc rax
.ok:
    mov [TSC_50MS], rax
    mov ecx, [param_interval_ms]
    mul rcx
    mov ecx, 50
    div rcx
    mov r13, rax                ; r13 = TSC ticks per interval
    mov ebx, [param_dirty_start_mib]
    shl rbx, 20                 ; rbx = start
    mov r12d, [param_dirty_mib]
    shl r12, 20
    add r12, rbx                ; r12 = end
    call print_counter
    call rdtsc64
    mov r14, rax                ; r14 = TSC at last print
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
    mov rsi, msg
    call puts
    mov rax, [COUNTER]
    mov rdi, NUMBUF + 23
    mov byte [rdi], 10
    mov byte [rdi+1], 0
    mov ecx, 10
.d:
    xor edx, edx
    div rcx
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz .d
    mov rsi, rdi
    call puts
    pop rdi
    ret

puts:                           ; rsi: NUL-terminated string
    mov dx, COM1
.l:
    lodsb
    test al, al
    jz .e
    out dx, al
    jmp .l
.e:
    ret

msg: db "counter ", 0

    times STAGE2_SECTORS * 512 + 512 - ($ - $$) db 0
