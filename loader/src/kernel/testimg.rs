//! Test-only builders of tiny kernel images assembled in Rust: ELF64 x86_64
//! with and without a PVH note, ELF32, foreign-architecture ELFs and minimal
//! bzImages, plus a guest memory and temporary-file helpers.

use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EM_X86_64, PT_LOAD, PT_NOTE};
use linux_loader::loader::bootparam::{
    setup_header, LOADED_HIGH, XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Guest RAM size used by most loader tests.
pub(crate) const TEST_RAM: u64 = 64 << 20;
/// A few bytes of x86 code: `hlt; jmp .-1` padded with `nop`s.
pub(crate) const CODE: &[u8] = &[0xf4, 0xeb, 0xfd, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90];
/// `pref_address` of the test bzImages.
pub(crate) const BZ_PREF_ADDRESS: u64 = 0x100_0000;
/// `init_size` of the test bzImages.
pub(crate) const BZ_INIT_SIZE: u64 = 0x20_0000;
/// `cmdline_size` of the test bzImages.
pub(crate) const BZ_CMDLINE_SIZE: u32 = 255;
/// Bytes of fake decompressor code before the payload in test bzImages.
pub(crate) const BZ_STUB_LEN: usize = 0x240;
/// Bytes after the payload in test bzImages.
pub(crate) const BZ_TRAILER_LEN: usize = 0x30;

/// Guest memory laid out as zvmm lays it out for `ram_size` bytes.
pub(crate) fn guest_memory(ram_size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(ram_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// Reads `len` guest bytes at `addr`.
pub(crate) fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// A file in the temporary directory, removed on drop.
pub(crate) struct TempFile(PathBuf);

impl TempFile {
    /// Writes `bytes` to a new uniquely named file.
    pub(crate) fn new(name: &str, bytes: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "zvmm-loader-{}-{unique}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Builds an ELF64 image with one PT_LOAD segment and optional notes.
pub(crate) struct ElfBuilder {
    paddr: u64,
    entry: u64,
    code: Vec<u8>,
    bss: u64,
    machine: u16,
    load: bool,
    notes: Vec<u8>,
}

impl ElfBuilder {
    /// An image loading at `paddr`, entered there.
    pub(crate) fn new(paddr: u64) -> Self {
        Self {
            paddr,
            entry: paddr,
            code: Vec::new(),
            bss: 0,
            machine: EM_X86_64,
            load: true,
            notes: Vec::new(),
        }
    }

    /// Sets the segment's file contents.
    pub(crate) fn code(mut self, code: &[u8]) -> Self {
        self.code = code.to_vec();
        self
    }

    /// Adds `bss` zero-filled bytes past the file contents.
    pub(crate) fn bss(mut self, bss: u64) -> Self {
        self.bss = bss;
        self
    }

    /// Sets `e_entry`.
    pub(crate) fn entry(mut self, entry: u64) -> Self {
        self.entry = entry;
        self
    }

    /// Sets `e_machine`.
    pub(crate) fn machine(mut self, machine: u16) -> Self {
        self.machine = machine;
        self
    }

    /// Leaves out the PT_LOAD segment.
    pub(crate) fn no_load(mut self) -> Self {
        self.load = false;
        self
    }

    /// Adds a Xen PHYS32_ENTRY note, 8-byte descriptor as Linux emits it.
    pub(crate) fn pvh_entry(self, entry: u32) -> Self {
        self.extra_note(b"Xen\0", 18, &u64::from(entry).to_le_bytes())
    }

    /// Adds a note to the PT_NOTE segment.
    pub(crate) fn extra_note(mut self, name: &[u8], kind: u32, desc: &[u8]) -> Self {
        for word in [name.len() as u32, desc.len() as u32, kind] {
            self.notes.extend_from_slice(&word.to_le_bytes());
        }
        for field in [name, desc] {
            self.notes.extend_from_slice(field);
            self.notes.resize(self.notes.len().next_multiple_of(4), 0);
        }
        self
    }

    /// Assembles the file: header, program headers, notes, code.
    pub(crate) fn build(self) -> Vec<u8> {
        let phnum = usize::from(self.load) + usize::from(!self.notes.is_empty());
        let ehsize = size_of::<Elf64_Ehdr>();
        let phsize = size_of::<Elf64_Phdr>();
        let notes_off = ehsize + phnum * phsize;
        let code_off = (notes_off + self.notes.len()).next_multiple_of(16);
        let mut phdrs = Vec::new();
        if self.load {
            phdrs.push(Elf64_Phdr {
                p_type: PT_LOAD,
                p_flags: 7,
                p_offset: code_off as u64,
                p_vaddr: self.paddr,
                p_paddr: self.paddr,
                p_filesz: self.code.len() as u64,
                p_memsz: self.code.len() as u64 + self.bss,
                p_align: 16,
            });
        }
        if !self.notes.is_empty() {
            phdrs.push(Elf64_Phdr {
                p_type: PT_NOTE,
                p_offset: notes_off as u64,
                p_filesz: self.notes.len() as u64,
                p_memsz: self.notes.len() as u64,
                p_align: 4,
                ..Default::default()
            });
        }
        let mut ehdr = Elf64_Ehdr {
            e_type: 2,
            e_machine: self.machine,
            e_version: 1,
            e_entry: self.entry,
            e_phoff: ehsize as u64,
            e_ehsize: ehsize as u16,
            e_phentsize: phsize as u16,
            e_phnum: phnum as u16,
            ..Default::default()
        };
        ehdr.e_ident[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        let mut out = ehdr.as_slice().to_vec();
        for phdr in &phdrs {
            out.extend_from_slice(phdr.as_slice());
        }
        out.extend_from_slice(&self.notes);
        out.resize(code_off, 0);
        out.extend_from_slice(&self.code);
        out
    }
}

/// A minimal 32-bit i386 ELF header.
pub(crate) fn elf32_image() -> Vec<u8> {
    let mut out = vec![0u8; 0x80];
    out[..8].copy_from_slice(b"\x7fELF\x01\x01\x01\x00");
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    out[18..20].copy_from_slice(&3u16.to_le_bytes()); // e_machine: 386
    out
}

/// Builds a minimal bzImage: boot sector with the setup header, setup
/// sectors, then protected-mode code made of a stub, the payload and a
/// trailer (the header's payload_offset/length point at the payload).
pub(crate) struct BzImageBuilder {
    hdr: setup_header,
    payload: Vec<u8>,
}

impl BzImageBuilder {
    /// A 2.15 64-bit relocatable bzImage carrying `payload`.
    pub(crate) fn new(payload: &[u8]) -> Self {
        let hdr = setup_header {
            setup_sects: 4,
            boot_flag: 0xaa55,
            jump: 0x66eb,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            min_alignment: 21,
            xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
            cmdline_size: BZ_CMDLINE_SIZE,
            payload_offset: BZ_STUB_LEN as u32,
            payload_length: payload.len() as u32,
            pref_address: BZ_PREF_ADDRESS,
            init_size: BZ_INIT_SIZE as u32,
            ..Default::default()
        };
        Self {
            hdr,
            payload: payload.to_vec(),
        }
    }

    /// Sets the boot protocol version.
    pub(crate) fn version(mut self, version: u16) -> Self {
        self.hdr.version = version;
        self
    }

    /// Sets `loadflags`.
    pub(crate) fn loadflags(mut self, loadflags: u8) -> Self {
        self.hdr.loadflags = loadflags;
        self
    }

    /// Sets `xloadflags`.
    pub(crate) fn xloadflags(mut self, xloadflags: u16) -> Self {
        self.hdr.xloadflags = xloadflags;
        self
    }

    /// Sets `init_size`.
    pub(crate) fn init_size(mut self, init_size: u32) -> Self {
        self.hdr.init_size = init_size;
        self
    }

    /// Sets `payload_offset` and `payload_length`.
    pub(crate) fn payload_window(mut self, offset: u32, length: u32) -> Self {
        self.hdr.payload_offset = offset;
        self.hdr.payload_length = length;
        self
    }

    /// Assembles the image.
    pub(crate) fn build(self) -> Vec<u8> {
        let setup = (usize::from(self.hdr.setup_sects) + 1) * 512;
        let mut out = vec![0u8; setup];
        let start = super::bzimage::SETUP_HEADER_OFFSET;
        out[start..start + size_of::<setup_header>()].copy_from_slice(self.hdr.as_slice());
        out.extend((0..BZ_STUB_LEN).map(|i| i as u8));
        out.extend_from_slice(&self.payload);
        out.extend(std::iter::repeat_n(0xcc, BZ_TRAILER_LEN));
        out
    }
}

/// The setup header of a default test bzImage.
pub(crate) fn test_setup_header() -> setup_header {
    BzImageBuilder::new(&[]).hdr
}
