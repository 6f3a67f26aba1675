"""SPIKE (issue #15): one migration of the test container between the spike pods, cold or
post-copy (lazy pages through the runc-lazy wrapper), with the numbers the design doc needs.

    python3 migrate.py cold|lazy [--src qmig-spike-src --dst qmig-spike-dst]

Prints one JSON line.  Needs setup.sh and a running container --runtime qmig-spike-runc in
pod qmig-spike-pa (run_one.sh starts it; setup.sh the rest).  Not product code.
"""
import argparse, gzip, json, os, shutil, socket, subprocess, sys, tarfile, threading, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CTL = Path("/run/qmig-spike/ctl")
WORK = Path("/tmp/qmig-spike")
LINK_NS, LINK_HOST, LINK_PEER = "qmig-spike-link", "198.18.250.1", "198.18.250.2"
PS_PORT, XFER_PORT = 27001, 27002
OLD, NEW, PORT = "198.18.201.2", "198.18.202.2", 9000
STORE = Path("/var/lib/containers/storage/overlay-containers")


def sh(*cmd, timeout=120, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: rc {p.returncode}: {p.stderr.strip()[-600:]}")
    return p.stdout.strip()


SRC_NS = "qmig-spike-src"
IN_SRC_NS = ["nsenter", f"--net=/run/netns/{SRC_NS}"]  # only the netns: podman keeps /sys


def link_bytes():
    out = sh("ip", "-n", SRC_NS, "-s", "-j", "link", "show", "qmig-spk0")
    st = json.loads(out)[0]["stats64"]
    return st["tx"]["bytes"] + st["rx"]["bytes"]


class Probe(threading.Thread):
    """Pings OLD and NEW every `interval` s; keeps the arrival times of replies per address."""

    def __init__(self, interval=0.002, kind=b"P"):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.0005)
        self.interval, self.stop, self.kind = interval, False, kind
        self.replies = {OLD: [], NEW: []}
        self.sent = {}  # seq -> send time
        self.rtt_new = []

    def run(self):
        seq, nxt = 0, time.time()
        while not self.stop:
            now = time.time()
            if now >= nxt:
                for ip in (OLD, NEW):
                    seq += 1
                    self.sent[seq] = now
                    try:
                        self.sock.sendto(self.kind + str(seq).encode(), (ip, PORT))
                    except OSError:
                        pass
                nxt = now + self.interval
            try:
                msg, (ip, _) = self.sock.recvfrom(256)
            except (socket.timeout, OSError):
                continue
            t = time.time()
            if msg.startswith(b"R") and ip in self.replies:
                self.replies[ip].append(t)
                if ip == NEW:
                    s = int(msg[1:].split()[0])
                    self.rtt_new.append((t, t - self.sent.get(s, t)))


def check_memory(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    t = time.time()
    s.sendto(b"S", (ip, PORT))
    return s.recv(100).decode(), time.time() - t


def clear_criu_lock(pod):
    infra = sh("podman", "pod", "inspect", pod, "--format", "{{.InfraContainerID}}")
    pid = sh("podman", "inspect", infra, "--format", "{{.State.Pid}}")
    n = 0
    rules = sh("nsenter", "-t", pid, "-n", "iptables", "-w", "5", "-S").splitlines()
    for line in rules:
        p = line.split()
        if p[:1] == ["-A"] and "CRIU" in p and p[1] != "CRIU":
            sh("nsenter", "-t", pid, "-n", "iptables", "-w", "5", "-D", *p[1:]); n += 1
    if any(l.startswith("-N CRIU") for l in rules):
        sh("nsenter", "-t", pid, "-n", "iptables", "-w", "5", "-F", "CRIU")
        sh("nsenter", "-t", pid, "-n", "iptables", "-w", "5", "-X", "CRIU")
    return n


def ship(path, name):
    """Send `path` through the shaped link to a receiver in the link namespace."""
    out = WORK / name
    recv = subprocess.Popen(["ip", "netns", "exec", LINK_NS, "timeout", "120", sys.executable,
                             str(HERE / "xfer.py"), "recv", LINK_PEER, str(XFER_PORT), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "LISTENING"
    sh(*IN_SRC_NS, sys.executable, str(HERE / "xfer.py"), "send", LINK_PEER, str(XFER_PORT), str(path))
    recv.wait(30)
    return out


def gz(src, dst):
    with open(src, "rb") as f, gzip.open(dst, "wb", compresslevel=1) as g:
        shutil.copyfileobj(f, g, 1 << 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["cold", "lazy"])
    ap.add_argument("--src", default="qmig-spike-src")
    ap.add_argument("--dst", default="qmig-spike-dst")
    ap.add_argument("--touch", action="store_true", help="each ping reads 64 KiB of fresh data")
    ap.add_argument("--kill-lazy-after", type=float, default=None,
                    help="rollback test: SIGKILL the destination's lazy-pages daemon this many s "
                         "after the restore (the link/destination dies mid lazy phase)")
    ap.add_argument("--compress", action="store_true", help="gzip -1 the tar before the link")
    a = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    for f in WORK.iterdir():
        f.unlink()
    cid = sh("podman", "inspect", a.src, "--format", "{{.Id}}")
    userdata = STORE / cid / "userdata"
    pod_b = sh("podman", "pod", "inspect", "qmig-spike-pb", "--format", "{{.Id}}")
    before_crc, _ = check_memory(OLD)
    diff = sh("podman", "diff", a.src)  # rootfs changes: must be empty for the hand-built tar
    r = {"method": a.method + ("+touch" if a.touch else ""), "compress": a.compress, "rootfs_diff": diff.splitlines()}
    probe = Probe(kind=b"T" if a.touch else b"P")
    probe.start()
    time.sleep(1.0)
    b0 = link_bytes()
    t0 = time.time()
    final = WORK / "src-final.tar"
    ck_cmd = ["timeout", "300", *IN_SRC_NS, "podman", "container", "checkpoint", "--export", str(final),
              "--ignore-volumes", "--compress", "none", a.src]
    if a.method == "cold":
        sh(*ck_cmd, timeout=300)
        t_dump = time.time()
        tar = final
    else:
        status = WORK / "status"
        status.write_bytes(b"")
        (CTL / "lazy-checkpoint").write_text(f"{LINK_HOST}:{PS_PORT} {status}\n")
        ck = subprocess.Popen(ck_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while status.read_bytes() != b"\0":
            if ck.poll() is not None:
                raise RuntimeError(f"lazy checkpoint ended early: {ck.stderr.read()}")
            time.sleep(0.002)
        t_dump = time.time()
        # the hand-built import tar: podman's layout, without network.status/stats-dump
        # (written only after runc returns) and without rootfs-diff.tar (diff checked empty)
        tar = WORK / "lazy-images.tar"
        with tarfile.open(tar, "w") as t:
            for n in ("config.dump", "spec.dump", "checkpoint", "artifacts", "ctr.log"):
                if (userdata / n).exists():
                    t.add(userdata / n, arcname=n)
    r["tar_bytes"] = tar.stat().st_size
    if a.compress:
        gz(tar, WORK / "send.tar.gz")
        tar = WORK / "send.tar.gz"
        r["sent_tar_bytes"] = tar.stat().st_size
    t_pack = time.time()
    moved = ship(tar, "moved" + ("".join(tar.suffixes)))
    t_moved = time.time()
    if a.method == "lazy":
        (CTL / "lazy-restore").write_text(f"{LINK_NS} {LINK_HOST} {PS_PORT} 300\n")
    sh("podman", "container", "restore", "--import", str(moved), "--pod", pod_b, "--name", a.dst,
       "--ignore-volumes", timeout=120)
    t_restored = time.time()
    while not probe.replies[NEW] and time.time() - t_restored < 30:
        time.sleep(0.001)
    t_first_new = probe.replies[NEW][0] if probe.replies[NEW] else None
    if a.method == "lazy" and a.kill_lazy_after is not None:
        time.sleep(a.kill_lazy_after)
        lp = int((CTL / "lazy-pages.pid").read_text())
        os.killpg(lp, 9)  # the daemon runs in its own session (setsid in runc-lazy)
        t_kill = time.time()
        out, err = ck.communicate(timeout=60)
        time.sleep(1.0)
        probe.stop = True
        probe.join()
        old_after = [t for t in probe.replies[OLD] if t > t_kill]
        r.update({"killed_lazy_daemon_after_s": a.kill_lazy_after,
                  "src_checkpoint_rc": ck.returncode, "src_checkpoint_err": err.strip()[-300:],
                  "src_state": sh("podman", "inspect", a.src, "--format", "{{.State.Status}}"),
                  "dst_state": sh("podman", "inspect", a.dst, "--format", "{{.State.Status}}"),
                  "old_ip_answers_after_kill": len(old_after),
                  "old_ip_first_answer_after_kill_ms":
                      round((old_after[0] - t_kill) * 1000) if old_after else None,
                  "src_lock_rules": sh("sh", "-c", "nsenter -t $(podman inspect $(podman pod "
                                       "inspect qmig-spike-pa --format '{{.InfraContainerID}}') "
                                       "--format '{{.State.Pid}}') -n iptables -S | grep -c CRIU",
                                       check=False)})
        try:
            r["old_ip_memory"] = check_memory(OLD)[0].split()[0]
        except OSError as exc:
            r["old_ip_memory"] = f"no answer ({exc})"
        r["memory_before"] = before_crc.split()[0]
        print(json.dumps(r), flush=True)
        return
    if a.method == "lazy":
        out, err = ck.communicate(timeout=300)
        r["src_checkpoint_rc"] = ck.returncode
        if ck.returncode:
            r["src_checkpoint_err"] = err.strip()[-400:]
        pidf = CTL / "lazy-pages.pid"
        lp = int(pidf.read_text()) if pidf.exists() else None
        while lp and Path(f"/proc/{lp}").exists() and time.time() - t0 < 300:
            time.sleep(0.005)
    t_all = time.time()
    time.sleep(0.5)
    probe.stop = True
    probe.join()
    b1 = link_bytes()
    last_old = max(probe.replies[OLD]) if probe.replies[OLD] else None
    after_crc, crc_s = check_memory(NEW)
    r.update({
        "freeze_to_resume_ms": round((t_first_new - last_old) * 1000, 1) if t_first_new else None,
        "dump_ms": round((t_dump - t0) * 1000), "pack_ms": round((t_pack - t_dump) * 1000),
        "transfer_ms": round((t_moved - t_pack) * 1000),
        "restore_ms": round((t_restored - t_moved) * 1000),
        "first_reply_after_restore_ms": round((t_first_new - t_restored) * 1000, 1) if t_first_new else None,
        "total_ms": round((t_all - t0) * 1000),
        "lazy_tail_ms": round((t_all - t_restored) * 1000),
        "link_bytes": b1 - b0,
        "memory_before": before_crc.split()[0], "memory_after": after_crc.split()[0],
        "full_memory_read_ms": round(crc_s * 1000, 1),
        "src_state": sh("podman", "inspect", a.src, "--format",
                        "{{.State.Status}} checkpointed={{.State.Checkpointed}}"),
        "dst_state": sh("podman", "inspect", a.dst, "--format", "{{.State.Status}} {{.OCIRuntime}}"),
        "src_lock_rules_removed": clear_criu_lock("qmig-spike-pa"),
    })
    if probe.rtt_new:
        lazy_rtts = [d for t, d in probe.rtt_new if t < t_all]
        r["rtt_during_lazy_ms_max"] = round(max(lazy_rtts) * 1000, 1) if lazy_rtts else None
        r["rtt_after_ms_median"] = round(sorted(d for t, d in probe.rtt_new if t >= t_all)[
            len([1 for t, _ in probe.rtt_new if t >= t_all]) // 2] * 1000, 2) \
            if any(t >= t_all for t, _ in probe.rtt_new) else None
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
