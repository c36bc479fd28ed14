#!/usr/bin/env python3
"""Seeds the fuzz corpora (fuzz/corpus/TARGET/) from real ffmpeg output and from what a real
onair server sends a viewer of it. Run by `make fuzz-corpus`; the seeds are committed.

  fuzz-corpus.py ONAIR_BIN OUT_DIR
"""
import os, socket, struct, subprocess, sys, tempfile, time, base64

onair, out = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp(prefix="onair-fuzz-corpus-")

def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)

src = ["-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10", "-f", "lavfi",
       "-i", "sine=frequency=440:sample_rate=44100", "-t", "1"]
x264 = ["-c:v", "libx264", "-preset", "veryfast", "-g", "5", "-pix_fmt", "yuv420p"]

# FLV as a TCP source or an RTMP publisher sends it, and its tag bodies one by one.
flv = os.path.join(tmp, "a.flv")
ffmpeg(*src, *x264, "-c:a", "aac", "-b:a", "32k", "-f", "flv", flv)
data = open(flv, "rb").read()
put("flv", "ffmpeg.flv", data)
at, tags = 13, []
while at + 11 <= len(data):
    kind, size = data[at], int.from_bytes(data[at + 1:at + 4], "big")
    body = data[at + 11:at + 11 + size]
    tags.append((kind, body))
    at += 11 + size + 4
for i, (kind, body) in enumerate(tags[:12]):
    put("flv", f"tag-{i}-{kind}", body)
# The AAC sequence header's AudioSpecificConfig, the AVC sequence header's avcC.
for kind, body in tags:
    if kind == 8 and len(body) > 2 and body[1] == 0:
        put("aac", "ffmpeg-asc", body[2:])
    if kind == 9 and len(body) > 5 and body[1] == 0:
        put("avc", "ffmpeg-avcc", body[5:])
put("aac", "lc-48k-mono", bytes([0x11, 0x88]))
# ADTS frames, as a TS PES carries them.
adts = os.path.join(tmp, "a.adts")
ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "0.07", "-c:a", "aac",
       "-b:a", "32k", "-ac", "1", "-f", "adts", adts)
put("aac", "ffmpeg-adts-48k-mono", open(adts, "rb").read())

# Raw H.264 as a camera sends it, with and without access unit delimiters.
for name, extra in [("ffmpeg-annexb", []), ("ffmpeg-aud-annexb", ["-bsf:v", "h264_metadata=aud=insert"])]:
    path = os.path.join(tmp, name + ".h264")
    ffmpeg(*src[:4], "-t", "1", *x264, *extra, "-f", "h264", path)
    h264 = open(path, "rb").read()
    put("annexb", name, h264)
    sps = h264.split(b"\x00\x00\x01")[1]
    put("avc", "ffmpeg-sps", sps.rstrip(b"\x00"))

# MPEG-TS as an SRT publisher sends it (H.264 with B-frames, HEVC; AAC), cut at packet
# boundaries to a few KB: the start with the PAT, PMT and a keyframe, and a piece from the
# middle that starts inside PES.
for name, codec in [("ffmpeg-h264", ["-c:v", "libx264", "-preset", "veryfast"]),
                    ("ffmpeg-hevc", ["-c:v", "libx265", "-x265-params", "log-level=none"])]:
    path = os.path.join(tmp, name + ".ts")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x54:rate=10", "-f", "lavfi",
           "-i", "sine=frequency=440:sample_rate=44100", "-t", "1", *codec, "-bf", "2",
           "-g", "5", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "32k", "-f", "mpegts", path)
    ts = open(path, "rb").read()
    put("ts", name + "-start.ts", ts[:22 * 188])
    if codec[1] == "libx264":
        put("ts", name + "-middle.ts", ts[30 * 188:52 * 188])

# CMAF as ffmpeg's dash muxer pushes it (-streaming 1 -ldash 1: one moof+mdat a frame): each
# representation's init segment, then the start of its first media segment, behind the
# target's two-byte init length and its read size.
dash = os.path.join(tmp, "dash")
os.makedirs(dash, exist_ok=True)
ffmpeg(*src, *x264, "-bf", "2", "-c:a", "aac", "-b:a", "32k", "-f", "dash", "-streaming", "1",
       "-ldash", "1", "-seg_duration", "1", os.path.join(dash, "manifest.mpd"))
for rep, step in [("0", 7), ("1", 200)]:
    init = open(os.path.join(dash, "init-stream%s.m4s" % rep), "rb").read()
    chunk = open(os.path.join(dash, "chunk-stream%s-00001.m4s" % rep), "rb").read()
    put("cmaf", "ffmpeg-dash-stream" + rep,
        struct.pack(">HB", len(init), step) + init + chunk[:6000])

# Enhanced RTMP as a current ffmpeg (9, PyPI's imageio-ffmpeg, which scripts/setup.sh
# installs) writes it: HEVC and AV1 tags, two video tracks and two audio tracks (the second of
# each as multitrack).
import imageio_ffmpeg
ff9 = imageio_ffmpeg.get_ffmpeg_exe()
for name, args in [
        ("ffmpeg9-hevc", ["-c:v", "libx265", "-x265-params", "log-level=none"]),
        ("ffmpeg9-av1", ["-c:v", "libsvtav1", "-preset", "12", "-svtav1-params", "fast-decode=1"]),
        ("ffmpeg9-two-tracks", ["-filter_complex", "[0:v]split=2[a][b];[b]scale=80:44[c]",
                                "-map", "[a]", "-map", "[c]", "-map", "1:a", *x264]),
        ("ffmpeg9-two-audio", ["-map", "0:v", "-map", "1:a", "-map", "1:a", *x264])]:
    path = os.path.join(tmp, name + ".flv")
    subprocess.run([ff9, "-hide_banner", "-loglevel", "error", "-y", *src, *args,
                    "-c:a", "aac", "-b:a", "32k", "-f", "flv", path], check=True,
                   stderr=subprocess.DEVNULL)
    data = open(path, "rb").read()
    put("flv", name + ".flv", data)
    at, seen = 13, {8: 0, 9: 0}
    while at + 11 <= len(data):
        kind, size = data[at], int.from_bytes(data[at + 1:at + 4], "big")
        if kind in seen and seen[kind] < 6:
            put("flv", f"{name}-{'video' if kind == 9 else 'audio'}-{seen[kind]}",
                data[at + 11:at + 11 + size])
            seen[kind] += 1
        at += 11 + size + 4

# The configurations of the other codecs, as ffmpeg boxes them in MP4 (what Enhanced RTMP's
# sequence start carries): x265's hvcC and its SPS, libaom's and SVT-AV1's av1C, libvpx's vpcC.
def mp4_box(data, name):
    i = data.find(name)
    return data[i + 4:i - 4 + int.from_bytes(data[i - 4:i], "big")]

for name, box, codec in [("x265-hvcc", b"hvcC", ["libx265", "-x265-params", "log-level=none"]),
                         ("aom-av1c", b"av1C", ["libaom-av1", "-cpu-used", "8"]),
                         ("svt-av1c", b"av1C", ["libsvtav1", "-preset", "12"]),
                         ("vpx-vpcc-box", b"vpcC", ["libvpx-vp9", "-deadline", "realtime"])]:
    path = os.path.join(tmp, name + ".mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30", "-frames:v", "3",
           "-c:v", *codec, path)
    config = mp4_box(open(path, "rb").read(), box)
    put("codecs", name, config)
    if box == b"hvcC":
        at = 23
        for _ in range(config[22]):
            kind, count = config[at] & 0x3f, int.from_bytes(config[at + 1:at + 3], "big")
            at += 3
            for _ in range(count):
                size = int.from_bytes(config[at:at + 2], "big")
                if kind == 33:
                    put("codecs", "x265-sps", config[at + 2:at + 2 + size])
                at += 2 + size

# What a server sends a viewer: each message alone (wire), and the sequence behind u16
# lengths (player_session).
server = subprocess.Popen([onair, "--rtmp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--srt", "127.0.0.1:0"],
                          stderr=subprocess.PIPE, text=True)
http = None
for line in server.stderr:
    if "onair ready rtmp=" in line:
        rtmp = line.split("rtmp=")[1].split()[0]
        http = line.split("http=")[1].split()[0]
        break
# The publisher goes through a proxy that keeps what it sends after the handshake (C0, C1 and
# C2 are 3073 bytes): real chunks of connect, publish, metadata and media, for the rtmp target.
import threading
proxy = socket.socket()
proxy.bind(("127.0.0.1", 0))
proxy.listen(1)
sent = bytearray()
def relay():
    c, _ = proxy.accept()
    rh, rp = rtmp.rsplit(":", 1)
    u = socket.create_connection((rh, int(rp)))
    def back():
        while True:
            d = u.recv(65536)
            if not d:
                break
            c.sendall(d)
    threading.Thread(target=back, daemon=True).start()
    while len(sent) < 3073 + (256 << 10):
        d = c.recv(65536)
        if not d:
            break
        sent.extend(d)
        u.sendall(d)
    # Keep relaying so that the publish goes on for the viewer below.
    while True:
        d = c.recv(65536)
        if not d:
            break
        u.sendall(d)
threading.Thread(target=relay, daemon=True).start()
pport = proxy.getsockname()[1]
pub = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
                        *src[:8], "-t", "30", *x264, "-c:a", "aac", "-b:a", "32k",
                        "-f", "flv", f"rtmp://127.0.0.1:{pport}/live/cam"])
host, port = http.rsplit(":", 1)
s = socket.create_connection((host, int(port)))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws/cam HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\r\n\r\n", 1)[1]

def need(n):
    global buf
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("server closed")
        buf += chunk

messages = []
deadline = time.time() + 20
while len(messages) < 40 and time.time() < deadline:
    need(2)
    n = buf[1] & 0x7f
    head = 2
    if n == 126:
        need(4); n = int.from_bytes(buf[2:4], "big"); head = 4
    elif n == 127:
        need(10); n = int.from_bytes(buf[2:10], "big"); head = 10
    need(head + n)
    if buf[0] & 0x0f == 2:
        messages.append(buf[head:head + n])
    buf = buf[head + n:]
pub.kill(); server.kill()
for i, m in enumerate(messages[:12]):
    put("wire", f"server-{i}", m)
for m in [b"\x20" + struct.pack(">Q", 123456789), b"\x32" + struct.pack(">Q", 1 << 20),
          b"\x40\x01\xff", b"\x40\x02" + struct.pack(">I", 200)]:
    put("wire", f"viewer-{m[0]:02x}-{len(m)}", m)
seq = b"".join(struct.pack(">H", len(m)) + m for m in messages if len(m) < 65536)
put("rtmp", "ffmpeg-publish", bytes(sent[3073:3073 + (64 << 10)]))
put("player_session", "server-session", seq)
print(f"corpus: {len(messages)} server messages, {len(tags)} FLV tags")
