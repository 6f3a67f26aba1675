# SPIKE: stands in for the idle broker inside the container.  Holds ~24 MB of live,
# broker-like (compressible) session data and answers UDP on :9000:
#   b"P<n>" -> b"R<n> <count>"   (idle: touches nothing but the interpreter's own pages)
#   b"T<n>" -> b"R<n> <count> x" (busy: also reads one 64 KiB slice of the data per ping)
#   b"S"    -> b"S<crc32 of all data> <count>"  (touches every page: proves the memory)
import os, socket, zlib
recs = []
i = 0
size = 0
while size < 24 << 20:
    r = (f'{{"client":"dev-{i:07d}","topic":"plant/{i % 97}/line/{i % 13}/temp",'
         f'"seq":{(i * 7919) % 1000003},"qos":{i % 3},"payload":"{os.urandom(6).hex()}"}}\n').encode()
    recs.append(r)
    size += len(r)
    i += 1
data = bytearray(b"".join(recs))
del recs
crc = zlib.crc32(data)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 9000))
print(f"ready {len(data)} bytes crc {crc:08x}", flush=True)
count = 0
slice_ = 64 << 10
while True:
    msg, peer = sock.recvfrom(2048)
    count += 1
    if msg.startswith(b"S"):
        sock.sendto(f"S{zlib.crc32(data):08x} {count}".encode(), peer)
    elif msg.startswith(b"P"):
        sock.sendto(b"R" + msg[1:] + f" {count}".encode(), peer)
    else:
        off = (count * 7 * slice_) % (len(data) - slice_)
        x = sum(data[off:off + slice_:4096])  # read one byte per page of the slice
        sock.sendto(b"R" + msg[1:] + f" {count} {x}".encode(), peer)
