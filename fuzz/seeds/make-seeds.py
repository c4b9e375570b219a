#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/seeds/TARGET/.

Each seed is a tiny input built here from the formats' specifications (no
file from elsewhere): kernel images, disk image headers, option strings,
API bodies and requests, device register sequences and virtqueue layouts
in the byte order the harnesses read them (fuzz/src/lib.rs). Run it again
after changing a harness's input layout: python3 fuzz/seeds/make-seeds.py
"""

import bz2
import gzip
import lzma
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# ---- kernel images ---------------------------------------------------------

CODE = bytes([0xF4, 0xEB, 0xFD]) + b"\x90" * 13


def elf64(pvh_note):
    """ELF64 x86_64 executable: one PT_LOAD at 16 MiB, optionally a PT_NOTE
    with Xen's PHYS32_ENTRY (PVH)."""
    phnum = 2 if pvh_note else 1
    ehsize, phsize = 64, 56
    code_off = ehsize + phnum * phsize
    note = b""
    if pvh_note:
        desc = struct.pack("<I", 0x1000000)
        note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    note_off = code_off + len(CODE)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, ehsize, 0, 0, ehsize, phsize, phnum, 64, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x1000000, 0x1000000, len(CODE), len(CODE), 0x1000)
    phdrs = load
    if pvh_note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdrs + CODE + note


def bzimage(payload):
    """A bzImage: boot sector and setup header (protocol 2.15, 64-bit
    entry, relocatable), then the protected-mode part whose payload is
    `payload` (compressed ELF) with its length appended as gzip does."""
    setup_sects = 1
    image = bytearray(512 * (setup_sects + 1))
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x214, 0x100000)
    image[0x234] = 1  # relocatable_kernel
    struct.pack_into("<I", image, 0x230, 0x200000)
    struct.pack_into("<H", image, 0x236, 0x3)  # xloadflags: KERNEL_64, above 4G
    struct.pack_into("<I", image, 0x238, 255)
    stub = b"\x90" * 0x40
    struct.pack_into("<I", image, 0x248, len(stub))
    struct.pack_into("<I", image, 0x24C, len(payload))
    struct.pack_into("<Q", image, 0x258, 0x1000000)
    struct.pack_into("<I", image, 0x260, 0x200000)
    pm = stub + payload + b"\0" * 16
    return bytes(image) + pm


def pe_stub():
    image = bytearray(0x200)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x80)
    image[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HH", image, 0x84, 0x8664, 1)
    return bytes(image)


def kernel_seeds():
    pvh, plain = elf64(True), elf64(False)
    put("kernel_image", "elf-pvh", pvh)
    put("kernel_image", "elf64", plain)
    put("kernel_image", "bzimage-gzip", bzimage(gzip.compress(plain, mtime=0) + struct.pack("<I", len(plain))))
    put("kernel_image", "bzimage-xz", bzimage(lzma.compress(plain, check=lzma.CHECK_CRC32)))
    put("kernel_image", "bzimage-bzip2", bzimage(bz2.compress(plain)))
    put("kernel_image", "bzimage-lzma", bzimage(lzma.compress(plain, format=lzma.FORMAT_ALONE)))
    put("kernel_image", "pe", pe_stub())
    put("kernel_image", "gzip", gzip.compress(plain, mtime=0))


# ---- disk images -----------------------------------------------------------


def qcow2(size, backing=b""):
    """qcow2 v3, 512-byte clusters: header, L1 table, refcount table and
    block, no data clusters."""
    cluster = 512
    l1_off, rt_off, rb_off = cluster, 2 * cluster, 3 * cluster
    l1_entries = max(1, -(-size // (cluster * (cluster // 8))))
    header = bytearray(cluster)
    struct.pack_into(
        ">4sIQIIQIIQQIIQ", header, 0, b"QFI\xfb", 3, 0, 0, 9, size, 0, l1_entries, l1_off, rt_off, 1, 0, 0
    )
    struct.pack_into(">QQQII", header, 72, 0, 0, 0, 4, 112)
    if backing:
        off = 200
        struct.pack_into(">QI", header, 8, off, len(backing))
        header[off : off + len(backing)] = backing
    refblock = bytearray(cluster)
    for i in range(4):
        struct.pack_into(">H", refblock, 2 * i, 1)
    rt = bytearray(cluster)
    struct.pack_into(">Q", rt, 0, rb_off)
    return bytes(header) + bytes(cluster) + bytes(rt) + bytes(refblock)


def mbr_fat():
    disk = bytearray(4096)
    struct.pack_into("<B3xBxxxII", disk, 446, 0x80, 0x0C, 1, 100)
    disk[510:512] = b"\x55\xaa"
    boot = bytearray(512)
    boot[0:3] = b"\xeb\x3c\x90"
    boot[3:11] = b"MSDOS5.0"
    struct.pack_into("<HBHBHHBHHHII", boot, 11, 512, 1, 1, 2, 16, 100, 0xF8, 1, 32, 2, 1, 0)
    boot[43:54] = b"SEED       "
    boot[54:62] = b"FAT12   "
    boot[510:512] = b"\x55\xaa"
    disk[512 : 512 + 512] = boot
    return bytes(disk)


def disk_seeds():
    put("disk_image", "raw", b"\0" + bytes(4096))
    put("disk_image", "qcow2", b"\0" + qcow2(1 << 20))
    put("disk_image", "qcow2-forced", b"\x01" + qcow2(1 << 20))
    put("disk_image", "qcow2-backing", b"\x02" + qcow2(1 << 20, b"base.raw"))
    put("disk_image", "mbr-fat", b"\0" + mbr_fat())
    put("disk_image", "vmdk", b"\0" + b"KDMV" + struct.pack("<IIQQ", 1, 3, 2048, 128) + bytes(480))
    put("disk_image", "vhd", b"\0" + bytes(512) + b"conectix" + bytes(504))
    put("disk_image", "gzip", b"\0" + gzip.compress(bytes(4096), mtime=0))


# ---- options, API ----------------------------------------------------------

OPTIONS = ["disk", "net", "fs", "vsock", "rng", "cpus", "memory", "serial", "console", "pit", "cloud-init", "cmdline", "expect"]


def line(option, value):
    return bytes([OPTIONS.index(option)]) + value.encode()


def option_seeds():
    lines = [
        line("disk", "path=/img/a.raw,readonly=on,image_type=raw,serial=disk1,id=d0"),
        line("disk", "path=/img/b.qcow2,backing_files=off,num_queues=2,queue_size=128,direct=off"),
        line("net", "tap=tap0,mac=52:54:00:12:34:56,ip=192.168.1.1,mask=255.255.255.0,num_queues=4,queue_size=256,id=n0"),
        line("net", "fd=[3,4],mac=52:54:00:12:34:57"),
        line("fs", "tag=vroot,socket=/run/fs.sock,num_queues=1,queue_size=1024,id=f0"),
        line("vsock", "cid=3,socket=/run/v.sock,id=v0"),
        line("rng", "src=/dev/urandom"),
        line("cpus", "boot=2,max=4,topology=1:2:1:1"),
        line("memory", "size=1G,shared=on,hotplug_size=512M"),
        line("serial", "file=/tmp/console.log"),
        line("console", "off"),
        line("pit", "on"),
        line("cloud-init", "user-data=/tmp/u.yaml,meta-data=/tmp/m.yaml,network-config=/tmp/n.yaml"),
        line("cmdline", "console=ttyS0 root=/dev/vda rw panic=-1"),
        line("expect", "Run /init|login: (\\w+)$"),
    ]
    put("options", "all", b"\n".join(lines))
    put("options", "sizes", b"\n".join([line("memory", "512M"), line("cpus", "8"), line("serial", "tty")]))


CREATE = (
    '{"payload":{"kernel":"/k/vmlinux","initramfs":"/k/initrd","cmdline":"console=ttyS0"},'
    '"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":536870912,"shared":true},'
    '"disks":[{"path":"/img/a.raw","readonly":true,"image_type":"Raw","id":"d0"}],'
    '"net":[{"tap":"tap0","mac":"52:54:00:12:34:56","num_queues":2,"queue_size":256}],'
    '"fs":[{"tag":"vroot","socket":"/run/fs.sock","num_queues":1,"queue_size":1024}],'
    '"vsock":{"cid":3,"socket":"/run/v.sock"},"rng":{"src":"/dev/urandom"},'
    '"serial":{"mode":"Pty"},"console":{"mode":"Off"},"iommu":false,"watchdog":false}'
)
SMALL = '{"payload":{"kernel":"vmlinux","cmdline":"console=ttyS0"},"cpus":{"boot_vcpus":2},"memory":{"size":536870912},"serial":{"mode":"Pty"},"console":{"mode":"Off"}}'


def request(method, endpoint, body=None, extra=""):
    head = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is None:
        return head + "\r\n"
    return head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"


def api_seeds():
    put("api_json", "full", CREATE)
    put("api_json", "small", SMALL)
    put("api_json", "platform", '{"payload":{"kernel":"k"},"platform":{"num_pci_segments":1,"serial_number":"s"},"balloon":null}')
    put(
        "http_request",
        "create-add-boot",
        request("PUT", "vm.create", SMALL)
        + request("PUT", "vm.add-disk", '{"path":"/img/b.raw","readonly":true}')
        + request("PUT", "vm.add-vsock", '{"cid":4,"socket":"/run/w.sock"}')
        + request("PUT", "vm.boot", "")
        + request("GET", "vm.info")
        + request("GET", "vmm.ping"),
    )
    put("http_request", "continue", request("PUT", "vm.create", CREATE, "Expect: 100-continue\r\n"))
    put("http_request", "close", request("GET", "vm.counters", None, "Connection: close\r\n") + request("PUT", "vmm.shutdown", ""))


# ---- cloud-init, devices ---------------------------------------------------


def cloud_init_seeds():
    user = b"#cloud-config\nhostname: vm1\nusers:\n  - name: zvmm\n"
    meta = b"instance-id: iid-1\nlocal-hostname: vm1\n"
    net = b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
    body = bytes([0x0E])
    for part in (user, meta, net, b"#vendor\n"):
        body += struct.pack("<H", len(part)) + part
    put("cloud_init", "all-files", body)
    put("cloud_init", "user-only", bytes([0]) + struct.pack("<H", len(user)) + user)


def access(write, offset, width, data=b"", wide=True):
    op = (1 if write else 0) | ({1: 0, 2: 1, 4: 2, 8: 3}[width] << 1) | (0x20 if wide else 0)
    return bytes([op]) + struct.pack("<H", offset) + (data if write else b"")


def legacy_seeds():
    ram = struct.pack("<II", 0x7FF00, 0x100)
    serial = (
        b"\x00" + access(True, 3, 1, b"\x80")
        + b"\x00" + access(True, 0, 1, b"\x01")
        + b"\x00" + access(True, 3, 1, b"\x03")
        + b"\x00" + access(True, 1, 1, b"\x0f")
        + b"\x06" + b"\x05hello"
        + b"\x00" + access(False, 5, 1)
        + b"\x00" + access(False, 0, 1)
        + b"\x00" + access(True, 0, 1, b"A")
        + b"\x00" + access(True, 4, 1, b"\x10")
    )
    cmos = b"".join(b"\x01" + access(True, 0, 1, bytes([r])) + b"\x01" + access(False, 1, 1) for r in (0, 2, 4, 0x0A, 0x0B, 0x34))
    ioapic = (
        b"\x02" + access(True, 0, 4, struct.pack("<I", 0x10))
        + b"\x02" + access(True, 0x10, 4, struct.pack("<I", 0x30))
        + b"\x02" + access(True, 0, 4, struct.pack("<I", 0x11))
        + b"\x02" + access(True, 0x10, 4, struct.pack("<I", 0))
        + b"\x02" + access(True, 0x40, 4, struct.pack("<I", 0x30))
        + b"\x02" + access(False, 0x10, 4)
    )
    put("legacy_devices", "serial", ram + serial)
    put("legacy_devices", "cmos", ram + cmos)
    put("legacy_devices", "ioapic", ram + ioapic)
    put("legacy_devices", "i8042-pm", ram + b"\x03" + access(True, 4, 1, b"\xfe") + b"\x04" + access(True, 1, 1, b"\x34") + b"\x05" + access(False, 0, 1))


def pci_cfg(write, register, width, data=b""):
    op = (1 if write else 0) | ({1: 0, 2: 1, 4: 2, 8: 3}[width] << 1)
    return bytes([op]) + b"\x40" + struct.pack("<H", register) + (data if write else b"")


def pci_bar(write, offset, width, data=b""):
    op = (1 if write else 0) | ({1: 0, 2: 1, 4: 2, 8: 3}[width] << 1) | (2 << 3)
    return bytes([op]) + (data if write else b"") + struct.pack("<H", offset)


def pci_seeds():
    probe = pci_cfg(False, 0, 4) + pci_cfg(True, 0x10, 4, b"\xff\xff\xff\xff") + pci_cfg(False, 0x10, 4) + pci_cfg(False, 0x34, 1)
    put("pci_config", "probe", b"\x00" + probe)
    common = b"".join(
        [
            pci_bar(True, 0x14, 1, b"\x00"),
            pci_bar(True, 0x14, 1, b"\x03"),
            pci_bar(True, 0x00, 4, struct.pack("<I", 1)),
            pci_bar(False, 0x04, 4),
            pci_bar(True, 0x08, 4, struct.pack("<I", 1)),
            pci_bar(True, 0x0C, 4, struct.pack("<I", 1)),
            pci_bar(True, 0x14, 1, b"\x0b"),
            pci_bar(True, 0x16, 2, b"\x00\x00"),
            pci_bar(True, 0x18, 2, b"\x10\x00"),
            pci_bar(True, 0x1A, 2, b"\x00\x00"),
            pci_bar(True, 0x20, 8, struct.pack("<Q", 0x0)),
            pci_bar(True, 0x28, 8, struct.pack("<Q", 0x4000)),
            pci_bar(True, 0x30, 8, struct.pack("<Q", 0x5000)),
            pci_bar(True, 0x1C, 2, b"\x01\x00"),
            pci_bar(True, 0x2000, 8, struct.pack("<Q", 0xFEE00000)),
            pci_bar(True, 0x2008, 4, struct.pack("<I", 0x4021)),
            pci_bar(True, 0x200C, 4, struct.pack("<I", 0)),
            pci_bar(True, 0x14, 1, b"\x0f"),
            pci_bar(True, 0x3000, 2, b"\x00\x00"),
            pci_bar(False, 0x1000, 1),
            pci_bar(True, 0x14, 1, b"\x00"),
        ]
    )
    put("pci_config", "driver", b"\x01" + common)


# ---- virtqueues ------------------------------------------------------------

BUFFERS = 0x20000


def desc(offset, length, flags, nxt):
    """kind 0x41: address BUFFERS + 8 * u16, 16-bit length."""
    assert offset % 8 == 0
    return bytes([0x41]) + struct.pack("<HHHB", offset // 8, length, flags, nxt)


def queue(size_shift, descs, heads, event_idx=False):
    mode = (size_shift << 4) | (0x10 if event_idx else 0)
    out = bytes([mode & 0xF0 if not event_idx else mode, len(descs)]) + b"".join(descs)
    return out + bytes([0, len(heads)]) + bytes(heads)


def negotiate(features, mask, queues):
    return struct.pack("<Q", features) + b"\x00" + bytes([mask]) + b"".join(queues)


NEXT, WRITE = 1, 2


def block_seeds():
    chain = [desc(0, 16, NEXT, 1), desc(0x200, 512, NEXT | WRITE, 2), desc(0x1000, 1, WRITE, 0)]
    flush = [desc(0x40, 16, NEXT, 4), desc(0x1008, 1, WRITE, 0)]
    write = [desc(0x80, 16, NEXT, 6), desc(0x400, 512, NEXT, 7), desc(0x1010, 1, WRITE, 0)]
    descs = chain + [desc(0, 0, 0, 0)] + flush + [desc(0, 0, 0, 0)]
    descs = chain + flush + write
    # heads 0 (read), 3 (flush), 5 (write)
    q = queue(4, descs, [0, 3, 5])
    buffers = bytearray(0x1100)
    struct.pack_into("<IIQ", buffers, 0, 0, 0, 0)  # IN sector 0
    struct.pack_into("<IIQ", buffers, 0x40, 4, 0, 0)  # FLUSH
    struct.pack_into("<IIQ", buffers, 0x80, 1, 0, 1)  # OUT sector 1
    buffers[0x400:0x600] = b"\xa5" * 512
    put("virtio_block", "read-flush-write", b"\x00\x03" + negotiate(~0 & (2**64 - 1), 1, [q]) + bytes(buffers))
    put("virtio_block", "qcow2", b"\x01\x03" + negotiate(~0 & (2**64 - 1), 1, [q]) + bytes(buffers))
    discard = [desc(0, 16, NEXT, 1), desc(0x40, 16, NEXT, 2), desc(0x1000, 1, WRITE, 0)]
    buffers = bytearray(0x1100)
    struct.pack_into("<IIQ", buffers, 0, 11, 0, 0)  # DISCARD
    struct.pack_into("<QII", buffers, 0x40, 0, 8, 0)
    put("virtio_block", "discard", b"\x00\x03" + negotiate(~0 & (2**64 - 1), 1, [queue(4, discard, [0])]) + bytes(buffers))


def net_seeds():
    frame = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00" + b"\x45" + bytes(40)
    frames = bytes([len(frame) // 4]) + frame[: (len(frame) // 4) * 4]
    rx = queue(4, [desc(0x800, 1526, WRITE, 0), desc(0x1000, 1526, WRITE, 0)], [0, 1])
    tx = queue(4, [desc(0, 12, NEXT, 1), desc(0x40, 60, 0, 0)], [0])
    ctrl = queue(4, [desc(0x2000, 2, NEXT, 1), desc(0x2008, 2, NEXT, 2), desc(0x2010, 1, WRITE, 0)], [0])
    buffers = bytearray(0x2100)
    buffers[0x40 : 0x40 + 60] = frame[12:72].ljust(60, b"\0")
    buffers[0x2000:0x2002] = b"\x04\x00"  # VIRTIO_NET_CTRL_MQ, VQ_PAIRS_SET
    buffers[0x2008:0x200A] = b"\x01\x00"
    mode = (1 << 1)  # one frame, one pair
    put("virtio_net", "rx-tx-ctrl", bytes([mode]) + frames + negotiate(~0 & (2**64 - 1), 0x7, [rx, tx, ctrl]) + bytes(buffers))


def vsock_seeds():
    def packet(op, dst_port, length=0, flags=0):
        return struct.pack("<QQIIIHHIII", 2, 3, 2000, dst_port, length, 1, op, flags, 65536, 0)

    rx = queue(4, [desc(0x1000, 4096, WRITE, 0), desc(0x2000, 4096, WRITE, 0)], [0, 1])
    tx = queue(4, [desc(0, 44, 0, 0), desc(0x40, 44, NEXT, 2), desc(0x80, 5, 0, 0), desc(0xC0, 44, 0, 0)], [0, 1, 3])
    buffers = bytearray(0x100)
    buffers[0:44] = packet(1, 1024)  # REQUEST to host port 1024
    buffers[0x40 : 0x40 + 44] = packet(5, 1024, 5)  # RW
    buffers[0x80:0x85] = b"hello"
    buffers[0xC0 : 0xC0 + 44] = packet(4, 1024, 0, 3)  # SHUTDOWN
    put("virtio_vsock", "connect-send", b"\x00\x00" + negotiate(~0 & (2**64 - 1), 0x3, [rx, tx]) + bytes(buffers))
    put("virtio_vsock", "host-connect", b"\x01\x0dCONNECT 1234\n" + negotiate(~0 & (2**64 - 1), 0x3, [rx, tx]) + bytes(buffers))


if __name__ == "__main__":
    kernel_seeds()
    disk_seeds()
    option_seeds()
    api_seeds()
    cloud_init_seeds()
    legacy_seeds()
    pci_seeds()
    block_seeds()
    net_seeds()
    vsock_seeds()
