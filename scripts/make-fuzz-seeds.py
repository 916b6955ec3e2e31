#!/usr/bin/env python3
"""Writes the seed corpora under Tests/FuzzCorpus/<target>/ (run once; the files are committed).
Each seed is a well-formed input of its target, so the fuzzer starts from the real formats."""
import json, os, struct, uuid, glob

ROOT = os.path.join(os.path.dirname(__file__), "..", "Tests", "FuzzCorpus")

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF

def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

pool = str(uuid.UUID(int=1)).upper()
metadata = {"generation": 7, "domainId": str(uuid.UUID(int=2)).upper(), "name": "seed", "format": 2,
            "pools": [{"id": pool, "name": "a", "arrayProfile": "file-backed", "poolProfile": "file-backed",
                       "extentBytes": 1 << 20, "metadataReserveBytes": 4 << 20, "stripe": False,
                       "luns": [{"path": "/tmp/a.img", "index": 0, "sizeBytes": 48 << 20, "dataStartBytes": 4 << 20, "extentCount": 44}],
                       "zeroing": [{"lun": 0, "extent": 40}]}],
            "vdisks": [{"id": str(uuid.UUID(int=3)).upper(), "name": "v", "sizeBytes": 4 << 20, "blockSize": 512, "thin": False,
                        "legs": [{"id": str(uuid.UUID(int=4)).upper(), "poolId": pool, "state": "in-sync",
                                  "extents": [{"lun": 0, "extent": i} for i in range(4)]}],
                        "mode": "automatic-failover", "dirtyRegions": True, "export": "read-write"}],
            "setupPools": [pool]}
payload = json.dumps(metadata).encode()
head = b"SVSPMETA" + struct.pack("<QQI", 7, len(payload), crc32c(payload))
head += struct.pack("<I", crc32c(head))
put("setup-record", "record", head + b"\0" * (4096 - len(head)) + payload)
put("setup-record", "json-only", b"\0" * 8 + payload)

h = b"SVSPDRL1" + struct.pack("<I", 1) + b"\0" * 4 + struct.pack("<QQ", 1 << 20, 64)
h += struct.pack("<I", crc32c(h))
put("bitmap-header", "header", h)

for f in glob.glob(os.path.join(os.path.dirname(__file__), "..", "hardware-profiles", "*", "*.yaml")):
    kind = {"arrays": 0, "pools": 1, "links": 2}[os.path.basename(os.path.dirname(f))]
    put("profile", os.path.basename(os.path.dirname(f)) + "-" + os.path.basename(f), bytes([kind]) + open(f, "rb").read())

for i, req in enumerate([{"command": "pool.create", "args": {"name": "p1", "luns": "/tmp/x\n/tmp/y", "create_size": "48M"}},
                         {"command": "vdisk.create", "args": {"name": "v", "pool": "p1", "size": "1G", "thin": "true"}},
                         {"command": "serve", "args": {"listen": "127.0.0.1:10809"}}]):
    put("mgmt-request", f"request-{i}", json.dumps(req).encode())

# NBD: client flags, options, requests (big-endian), as a client sends after the greeting.
OPT = 0x49484156454F5054
def opt(o, body=b""): return struct.pack(">QII", OPT, o, len(body)) + body
def go(name): n = name.encode(); return opt(7, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
def req(t, cookie, off, ln, flags=0): return struct.pack(">IHHQQI", 0x25609513, flags, t, cookie, off, ln)
flags = struct.pack(">I", 3)
put("nbd", "list-abort", flags + opt(3) + opt(2))
put("nbd", "go-rw", flags + go("thick") + req(1, 1, 0, 4096) + b"\xab" * 4096 + req(0, 2, 0, 4096) + req(3, 3, 0, 0)
    + req(1, 4, 512, 512, 1) + b"\xcd" * 512 + req(2, 5, 0, 0))
meta = b"base:allocation"
setmeta = opt(10, struct.pack(">I", 4) + b"thin" + struct.pack(">I", 1) + struct.pack(">I", len(meta)) + meta)
put("nbd", "structured-thin", flags + opt(8) + setmeta + go("thin") + req(1, 1, 1 << 20, 8192) + b"\x11" * 8192
    + req(7, 2, 0, 8 << 20) + req(4, 3, 0, 4 << 20) + req(6, 4, 4096, 4096) + req(0, 5, 0, 65536) + req(2, 6, 0, 0))
put("nbd", "info-unknown", flags + opt(6, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)) + go("nope") + opt(1, b"thick"))

label = b"SVSPLUN1" + struct.pack("<I", 1) + uuid.UUID(int=2).bytes + uuid.UUID(int=1).bytes + struct.pack("<IIQ", 0, 1, 48 << 20)
label += b"\0" * (4092 - len(label))
put("lun-label", "label", label + struct.pack("<I", crc32c(label)))

# pool-metadata: edits (u16 page, u16 slot, u64 value, little-endian) to the harness's
# formatted area (4096 chunks: root table pages 2..17, journal 18..81, tree pages from 82).
def edits(*e): return b"".join(struct.pack("<HHQ", p, s, v) for p, s, v in e)
put("pool-metadata", "unchanged", b"")
put("pool-metadata", "root-zeroed", edits((2, 2, 0)))
put("pool-metadata", "root-info-height", edits((2, 3, (1 << 56) | (9 << 48) | 4096)))
put("pool-metadata", "journal-count", edits((18, 0, 600)))
put("pool-metadata", "journal-target-superblock", edits((18, 5, 0)))
put("pool-metadata", "child-outside", edits((82, 5, (1 << 62) | 5000)))
put("pool-metadata", "tag-three", edits((83, 0, 0xFFFFFFFFFFFFFFFF)))
put("pool-metadata", "linear-run-overflow", edits((82, 1, (2 << 62) | ((1 << 62) - 2))))
# Every journal page's first slot (a header's record count) past Int: the replay must refuse it.
put("pool-metadata", "journal-count-huge", edits(*[(p, 0, 1 << 63) for p in range(18, 82)]))

# replication-frame: streams of frames as a peer sends them (see ReplicationProtocol.swift).
def frame(kind, payload, version=1):
    return struct.pack(">IHHII", 0x53565250, version, kind, len(payload), 0) + payload

def name(s):
    return bytes([len(s)]) + s.encode()

peer_id = uuid.UUID(int=5).bytes
put("replication-frame", "hello", frame(1, struct.pack(">HH", 1, 1) + peer_id + name("site-a")))
put("replication-frame", "welcome-then-pings", frame(2, struct.pack(">H", 1) + peer_id + name("site-b"))
    + frame(4, struct.pack(">Q", 42)) + frame(5, struct.pack(">Q", 42)))
put("replication-frame", "refuse", frame(3, struct.pack(">HH", 2, 12) + b"unknown peer"))
put("replication-frame", "truncated", frame(1, struct.pack(">HH", 1, 1) + peer_id + name("site-a"))[:30])
