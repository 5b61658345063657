"""Receive (and send-back) rate of the node, side by side with DCMTK storescp and Orthanc.

    .venv/bin/python benchmarks/receive.py [--repeats 3] [--ct 500] [--cr 100] [--out benchmarks/results/receive.json]

Workloads: CT-like instances of 256x256 16-bit and CR-like instances of 2048x2048 16-bit, pushed by
DCMTK storescu over one association and over four parallel ones. Every receiver writes to disk:
storescp and Orthanc as they do by default, the node with fsync on (its durable default). The wall
time runs from the first storescu's start to the last one's exit. The node is also measured with
fsync off (``node.fsync: false``), which shows what the device flush per instance costs, and storescp is also
measured with ``benchmarks/fsync_on_close.c`` preloaded (built with the system C compiler when there is one), so
that it fsyncs each file before it answers: the same durability as the node, in DCMTK's C code. The node's
send-back rate is its sender emptying an outbox of CT-like objects into Orthanc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analyzers.phantoms import PhantomPatient, image_dataset, save  # noqa: E402

from dicomnode.uids import CR_IMAGE, CT_IMAGE  # noqa: E402
from tests.peers import PEER_ENV, NodeProcess, Orthanc, free_port, wait_port  # noqa: E402


def make_files(folder: Path, n: int, size: int, modality: str, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    pat = PhantomPatient.make(rng, "bench", seed)
    series = f"1.2.826.0.1.3680043.10.1137.88.{seed}"
    base = (rng.random((size, size)) * 3000).astype(np.uint16)
    files = []
    for i in range(n):
        pixels = np.roll(base, i, axis=0)
        ds = image_dataset(pixels, patient=pat, modality=modality, sop_class_uid=CT_IMAGE if modality == "CT" else CR_IMAGE,
                           series_uid=series, instance_number=i + 1, pixel_spacing=(0.5, 0.5))
        files.append(save(ds, folder))
    return files


def push(port: int, files: list[Path], parallel: int, aec: str) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, c)],
                              env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    errors = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    bad = [e.decode(errors="replace")[-300:] for p, e in zip(procs, errors) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"storescu failed: {bad[0]}")
    return dt


def build_fsync_shim(work: Path) -> Path | None:
    """Compile benchmarks/fsync_on_close.c (LD_PRELOAD: storescp fsyncs each file it writes); None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print(json.dumps({"note": "no C compiler: storescp is measured without the fsync-per-file reference"}), flush=True)
        return None
    out = work / "fsync_on_close.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(REPO / "benchmarks" / "fsync_on_close.c"), "-ldl"],
                   check=True)
    return out


STORESCP_FSYNC = "storescp (fsync per file)"


class Storescp:
    def __init__(self, work: Path, shim: Path | None = None) -> None:
        self.work = work
        self.port = free_port()
        self.shim = shim
        self.counts = work / "fsync-counts"

    def start(self) -> "Storescp":
        out = self.work / "storescp"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = dict(PEER_ENV)
        if self.shim is not None:
            shutil.rmtree(self.counts, ignore_errors=True)
            self.counts.mkdir(parents=True)
            env.update(LD_PRELOAD=str(self.shim), DICOMNODE_FSYNC_COUNT_DIR=str(self.counts))
        self.proc = subprocess.Popen(["/usr/bin/storescp", "--fork", "-od", str(out), "-aet", "STORESCP", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, 20, self.proc)
        return self

    def flushed(self) -> int:
        """Files fsynced by the shim in the association children that have exited."""
        if not self.counts.is_dir():
            return 0
        return sum(int(f.read_text()) for f in self.counts.iterdir() if f.suffix != ".part")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(20)


def start_receiver(receiver: str, sub: Path, shim: Path | None = None):
    if receiver in ("storescp", STORESCP_FSYNC):
        srv = Storescp(sub, shim if receiver == STORESCP_FSYNC else None).start()
        return srv, srv.port, "STORESCP"
    if receiver == "orthanc":
        srv = Orthanc(sub, aet="ORTHANC").start()
        return srv, srv.dicom_port, "ORTHANC"
    node_cfg = {"fsync": receiver != "dicomnode (fsync off)", "receivers": 2 if "2 receiver" in receiver else 1}
    srv = NodeProcess(sub, rules=[], port=free_port(), config={"logging": {"level": "INFO"}, "node": node_cfg}).start()
    # measure a node that has finished starting: its worker process loading the analyzers competes for the CPU
    srv.wait_for(lambda: any(e.get("event") == "worker_started" for e in srv.log_events()), 60, "the worker")
    time.sleep(0.5)
    if node_cfg["receivers"] > 1:
        srv.wait_for(lambda: sum(e.get("event") == "receiver_listening" for e in srv.log_events()) == 2,
                     30, "the second receiver")
    return srv, srv.port, "DICOMNODE"


def run_receivers(work: Path, workloads: dict[str, list[Path]], repeats: int, shim: Path | None = None) -> list[dict]:
    """Every receiver once per round, rounds repeated: drift in the machine's load hits all of them alike."""
    rows = []
    for name, files in workloads.items():
        mb = sum(f.stat().st_size for f in files) / 1e6
        for parallel in (1, 4):
            receivers = ["storescp", *([STORESCP_FSYNC] if shim else []), "orthanc", "dicomnode", "dicomnode (fsync off)"]
            if parallel > 1:
                receivers.append("dicomnode (2 receiver processes)")
            times: dict[str, list[float]] = {r: [] for r in receivers}
            for r in range(repeats):
                for receiver in receivers:
                    sub = work / f"{receiver}-{name}-{parallel}-{r}"
                    srv, port, aec = start_receiver(receiver, sub, shim)
                    try:
                        times[receiver].append(push(port, files, parallel, aec))
                        if receiver == STORESCP_FSYNC:
                            check_flushed(srv, len(files))
                    finally:
                        srv.stop()
                        shutil.rmtree(sub, ignore_errors=True)
            for receiver in receivers:
                t = statistics.median(times[receiver])
                rows.append({"workload": name, "associations": parallel, "receiver": receiver, "instances": len(files),
                             "seconds": round(t, 3), "inst_per_s": round(len(files) / t, 1), "mb_per_s": round(mb / t, 1),
                             "runs": [round(x, 3) for x in times[receiver]]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def check_flushed(srv: Storescp, expected: int, timeout: float = 10) -> None:
    """The reference row counts only if storescp really fsynced every instance (its children report as they exit)."""
    deadline = time.monotonic() + timeout
    while srv.flushed() < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    if srv.flushed() != expected:
        raise RuntimeError(f"storescp with the fsync shim flushed {srv.flushed()} files for {expected} instances")


def flush_latency(work: Path, n: int = 200, size: int = 132_108) -> float:
    """Median milliseconds to create, write and fsync one CT-sized file here: the floor under a durable store."""
    folder = work / "fsync-probe"
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    lat = []
    for i in range(n):
        t = time.perf_counter()
        fd = os.open(folder / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        lat.append(time.perf_counter() - t)
    shutil.rmtree(folder, ignore_errors=True)
    return round(statistics.median(lat) * 1e3, 3)


def run_sender(work: Path, files: list[Path], repeats: int) -> dict:
    from pydicom import dcmread

    from dicomnode.config import Config
    from dicomnode.logs import setup_logging
    from dicomnode.outbox import Outbox
    from dicomnode.sender import Sender
    from dicomnode.store import Store

    setup_logging(level="WARNING")  # one line per object sent would flood the output
    times = []
    for r in range(repeats):
        pacs = Orthanc(work / f"send-pacs-{r}").start()
        try:
            cfg = Config.model_validate({"destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                                         "storage": {"data_dir": str(work / f"send-node-{r}")}})
            store = Store(cfg.data_dir, fsync=False)
            outbox = Outbox(store, backoff_initial=0.05, backoff_max=0.5)
            rows = []
            for f in files:
                ds = dcmread(f, stop_before_pixels=True)
                rows.append({"study_uid": ds.StudyInstanceUID, "destination": "pacs", "sop_uid": ds.SOPInstanceUID,
                             "sop_class_uid": ds.SOPClassUID, "path": str(f)})
            with store.transaction() as db:
                Outbox.add(db, None, rows, time.time())
            sender = Sender(cfg, outbox)
            t0 = time.perf_counter()
            while outbox.depths().get("pending") and time.perf_counter() - t0 < 300:
                if not sender.round():
                    time.sleep(0.05)
            times.append(time.perf_counter() - t0)
            retried = store.db.execute("SELECT COUNT(*) FROM outbox WHERE attempts > 1").fetchone()[0]
            if retried:
                print(json.dumps({"note": f"{retried} objects needed a second attempt"}), flush=True)
            assert outbox.depths().get("sent") == len(files), outbox.depths()
        finally:
            pacs.stop()
            shutil.rmtree(work / f"send-pacs-{r}", ignore_errors=True)
    t = statistics.median(times)
    row = {"workload": "send-back CT-like", "instances": len(files), "seconds": round(t, 3), "inst_per_s": round(len(files) / t, 1),
           "runs": [round(x, 3) for x in times]}
    print(json.dumps(row), flush=True)
    return row


MARK_START, MARK_END = "<!-- receive:start -->", "<!-- receive:end -->"


def markdown(result: dict) -> str:
    """The README table: each receiver beside storescp and Orthanc on the same workload and run."""
    rows = result["receive"]
    durable_ref = any(r["receiver"] == STORESCP_FSYNC for r in rows)
    lines = [f"Measured {result['date']} on this project's {result['machine']['cpus']}-core machine "
             f"(Python {result['machine']['python']}), medians of {result.get('repeats', '?')} runs, with "
             "`.venv/bin/python benchmarks/receive.py`. storescp and Orthanc write without fsync; the node's "
             "default writes each instance durably (fsync) before answering."
             + (f" `{STORESCP_FSYNC}` is the same storescp with `benchmarks/fsync_on_close.c` preloaded, so that it "
                "fsyncs each file before it answers, as the node does (the run checks that it flushed every instance)."
                if durable_ref else ""), ""]
    head = "| workload | associations | receiver | inst/s | MB/s | × storescp inst/s | × storescp MB/s | × Orthanc inst/s |"
    lines += [head + (" × storescp (fsync per file) inst/s |" if durable_ref else ""),
              "| --- " * (9 if durable_ref else 8) + "|"]
    for r in rows:
        same = [x for x in rows if x["workload"] == r["workload"] and x["associations"] == r["associations"]]
        ref = next(x for x in same if x["receiver"] == "storescp")
        orth = next(x for x in same if x["receiver"] == "orthanc")
        line = (f"| {r['workload']} | {r['associations']} | {r['receiver']} | {r['inst_per_s']} | {r['mb_per_s']} | "
                f"{r['inst_per_s'] / ref['inst_per_s']:.2f} | {r['mb_per_s'] / ref['mb_per_s']:.2f} | {r['inst_per_s'] / orth['inst_per_s']:.2f} |")
        if durable_ref:
            dref = next(x for x in same if x["receiver"] == STORESCP_FSYNC)
            line += f" {r['inst_per_s'] / dref['inst_per_s']:.2f} |"
        lines.append(line)
    send = result["send"]
    lines += ["", "Against the targets (the node with fsync on, against storescp and Orthanc in the same rounds):", "",
              "| target | measured | met |", "| --- | --- | --- |"]
    for target, value, ok in targets(result):
        lines.append(f"| {target} | {value} | {'yes' if ok else '**no**'} |")
    lines += ["", f"Load average (1 min) before / after the run: {result.get('load_before', '?')} / "
              f"{result.get('load_after', '?')}; creating, writing and fsyncing one 132 KB file took "
              f"{result.get('flush_ms', '?')} ms (median) on this disk during the run."]
    lines += ["", f"Sending results back (the node's sender emptying an outbox of {send['instances']} CT-like objects into "
              f"Orthanc over one association): **{send['inst_per_s']} inst/s** (runs: {send['runs']} s)."]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets, each as (text, measured ratio, met)."""
    rows = result["receive"]

    def pick(workload: str, assoc: int, receiver: str) -> dict:
        return next(x for x in rows if x["workload"].startswith(workload) and x["associations"] == assoc
                    and x["receiver"] == receiver)

    out = []
    for workload, label in (("CT", "small instances"), ("CR", "large images")):
        for assoc in (1, 4):
            node, orth = pick(workload, assoc, "dicomnode"), pick(workload, assoc, "orthanc")
            ratio = node["inst_per_s"] / orth["inst_per_s"]
            out.append((f"≥ Orthanc's rate, {label}, {assoc} association{'s' if assoc > 1 else ''}", f"{ratio:.2f}×", ratio >= 1))
    for assoc in (1, 4):
        node, ref = pick("CR", assoc, "dicomnode"), pick("CR", assoc, "storescp")
        ratio = node["mb_per_s"] / ref["mb_per_s"]
        out.append((f"≥ 0.8× storescp MB/s, large images, {assoc} association{'s' if assoc > 1 else ''}", f"{ratio:.2f}×", ratio >= 0.8))
    for assoc in (1, 4):
        node, ref = pick("CT", assoc, "dicomnode"), pick("CT", assoc, "storescp")
        ratio = node["inst_per_s"] / ref["inst_per_s"]
        out.append((f"≥ 0.5× storescp inst/s, small instances, {assoc} association{'s' if assoc > 1 else ''}", f"{ratio:.2f}×", ratio >= 0.5))
    send = result["send"]["inst_per_s"]
    out.append(("send-back ≥ 100 inst/s to Orthanc", f"{send} inst/s", send >= 100))
    return out


def write_readme(result: dict, readme: Path) -> None:
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{MARK_START}\n{markdown(result)}\n{MARK_END}"
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Receive and send-back rate\n\n" + block + "\n"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ct", type=int, default=500)
    ap.add_argument("--cr", type=int, default=100)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "receive.json"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--readme", default=str(REPO / "benchmarks" / "README.md"), help="update this file's receive table ('' to skip)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dicomnode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        workloads = {
            "CT 256x256x16": make_files(work / "ct", args.ct, 256, "CT", 1),
            "CR 2048x2048x16": make_files(work / "cr", args.cr, 2048, "CR", 2),
        }
        shim = build_fsync_shim(work)
        load_before = round(os.getloadavg()[0], 2)
        flush_ms = flush_latency(work)
        rows = run_receivers(work, workloads, args.repeats, shim)
        send = run_sender(work, workloads["CT 256x256x16"], args.repeats)
        result = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "receive": rows, "send": send,
                  "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "load_before": load_before,
                  "load_after": round(os.getloadavg()[0], 2), "flush_ms": flush_ms}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        if args.readme:
            write_readme(result, Path(args.readme))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
