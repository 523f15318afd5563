"""Host-agent overhead: CPU seconds and peak RSS per collection cycle, against a bare pass over /proc.

Workload (real, not synthesised): 500 real processes (``sleep``), 2,000 real loopback TCP sockets
(1,000 connections, both ends, held by one helper process that also opens and closes 5 new
connections per second, so the socket-owner lookup runs every cycle), and 8 GPUs from the pynvml fake
(tests/fakes/fake_pynvml.py: the same Python call path as the real binding, minus the driver).
Events go to Kafka (the embedded broker) through the spool, as in production.

The agent runs in a fresh child process so its RSS is its own.  As root, a third run ("isolated") puts the
agent's network side and the socket helper in a private network namespace, so that other tenants of a shared
machine (their flows and loopback packets) do not count against the agent.  The baseline, measured in the same
run, is the cheapest useful thing a monitor can do per cycle: list /proc and read every
/proc/PID/stat once.  Figures are printed as absolute values and as ratios to that baseline.

With ``--scheduler kubernetes`` the agent also reads a fake kubelet's PodResources API (tests/fakes/fake_kubelet.py,
in a process of its own: eight pods, one GPU each) every ``refresh_s``, and walks a pod cgroup tree; its thread and
gRPC's count in "other threads".

    python bench/agent_overhead.py [--cycles 30] [--interval 1.0] [--scheduler kubernetes]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_PROCESSES = 500
N_CONNECTIONS = 1000  # 2,000 sockets
N_GPUS = 8

SOCKET_HELPER = textwrap.dedent("""
    import resource, socket, sys, time
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(4096)
    keep = []
    for _ in range(int(sys.argv[1])):
        c = socket.create_connection(server.getsockname()); a, _ = server.accept(); keep += [c, a]
    print("ready", flush=True)
    while True:  # churn: 5 new short flows a second
        for _ in range(5):
            c = socket.create_connection(server.getsockname()); a, _ = server.accept()
            time.sleep(0.1); c.close(); a.close()
        time.sleep(0.5)
""")

AGENT_CHILD = textwrap.dedent("""
    import json, os, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from agents.agent import Agent
    from gpusentry.config import Config
    from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, FakeProcess
    cycles, interval, bootstrap, spool, mode = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
    cfg = Config()
    cfg.agent.host_name = "bench-host"
    cfg.agent.spool_dir = spool
    cfg.agent.interval_s = interval
    if mode == "unprivileged":
        cfg.agent.process_source = "poll"
        cfg.agent.capture = "off"
    if os.environ.get("BENCH_SCHEDULER"):
        sched = json.loads(os.environ["BENCH_SCHEDULER"])
        cfg.agent.pod_logs_dir = sched.pop("pod_logs_dir")
        for key, value in sched.items():
            setattr(cfg.agent.scheduler, key, value)
    outputs = ["jsonl:/dev/null"]
    if bootstrap != "-":
        cfg.kafka.bootstrap_servers = bootstrap
        outputs = ["kafka"]
    pids = [int(p) for p in os.environ["BENCH_PIDS"].split(",")]
    gpus = [FakeGpu(f"GPU-{i}", gpu_pct=97, memory_used=70 << 30,
                    processes=[FakeProcess(pids[i]), FakeProcess(pids[i + 8])],
                    samples=[(pids[i], 1, 99)]) for i in range(8)]
    helper = None
    if mode == "isolated":
        outputs = ["jsonl:/dev/null"]  # the broker lives in the host network namespace
    agent = Agent(cfg, outputs=outputs, nvml=FakeNvml(gpus).module(), strict=True)
    if mode == "isolated":
        # The process-events subscription has to be made in the host network namespace; then this thread
        # moves to a private one, where the network collector, capture and socket helper see only the
        # benchmark's own sockets and packets, not those of other tenants of the machine.
        import ctypes, subprocess
        started = []
        for c in agent.collectors:
            if c.name == "network":
                if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
                    raise SystemExit("unshare(CLONE_NEWNET) failed")
                subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
                helper = subprocess.Popen([sys.executable, "-c", os.environ["BENCH_SOCKET_HELPER"], "1000"],
                                          stdout=subprocess.PIPE, text=True)
                assert helper.stdout.readline().strip() == "ready"
            if c.start():
                started.append(c)
        agent.collectors = started
    else:
        agent.start()
    per_collector = {c.name: 0.0 for c in agent.collectors}
    def timed(c):
        inner = c.collect
        def collect(now):
            t = time.thread_time()
            try:
                return inner(now)
            finally:
                per_collector[c.name] += time.thread_time() - t
        return collect
    for c in agent.collectors:
        c.collect = timed(c)
    t0 = time.process_time()
    first_events = agent.run_cycle()
    first_cpu = time.process_time() - t0
    rss_after_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_collector = {k: 0.0 for k in per_collector}
    main_thread = 0.0
    cpu, events, wall0 = 0.0, 0, time.monotonic()
    for _ in range(cycles):
        time.sleep(interval)
        c0 = time.process_time()  # all threads: the netlink and capture readers count too
        m0 = time.thread_time()
        events += agent.run_cycle()
        cpu += time.process_time() - c0
        main_thread += time.thread_time() - m0
    wall = time.monotonic() - wall0
    total_cpu = time.process_time() - t0
    def thread_cpu():
        # CPU seconds per thread name, from /proc/self/task (librdkafka's threads are named rdk:*).
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                name = open(f"/proc/self/task/{tid}/comm").read().strip()
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            key = "kafka client" if name.startswith("rdk:") else name
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out
    threads = thread_cpu()
    agent.close(timeout=10)
    if helper is not None:
        helper.kill()
        helper.wait()
    print(json.dumps({"first_cycle_cpu_s": first_cpu, "first_cycle_events": first_events,
                      "cycle_cpu_s": cpu / cycles, "events_per_cycle": events / cycles,
                      "cpu_share_of_core": total_cpu / (wall + first_cpu),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_first_cycle_mb": rss_after_first / 1024,
                      "main_thread_cycle_s": main_thread / cycles,
                      "threads_s": threads, "wall_s": wall + first_cpu,
                      "per_collector_ms": {k: v / cycles * 1000 for k, v in per_collector.items()},
                      "process_source": next((c.source for c in agent.collectors if c.name == "process"), None)}))
""")

BASELINE_CHILD = textwrap.dedent("""
    import json, os, resource, time
    def bare_pass():
        n = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as fh:
                        fh.read()
                    n += 1
                except OSError:
                    pass
        return n
    bare_pass()
    runs = 30
    t0 = time.process_time()
    for _ in range(runs):
        n = bare_pass()
    print(json.dumps({"cpu_s": (time.process_time() - t0) / runs, "processes": n,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run_child(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                         env={**os.environ, **(env or {})}, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--no-kafka", action="store_true", help="write events to /dev/null instead of Kafka")
    parser.add_argument("--scheduler", choices=["none", "kubernetes"], default="none",
                        help="also read a fake kubelet's allocations (default: no scheduler)")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    print(f"workload: {N_PROCESSES} real processes, {2 * N_CONNECTIONS} real loopback sockets (+5 new flows/s), "
          f"{N_GPUS} fake GPUs; {args.cycles} cycles at {args.interval:g} s", flush=True)
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(N_PROCESSES)]
    helper = subprocess.Popen([sys.executable, "-c", SOCKET_HELPER, str(N_CONNECTIONS)], stdout=subprocess.PIPE,
                              text=True)
    broker = None
    kubelet = None
    node_dir = tempfile.TemporaryDirectory()
    try:
        assert helper.stdout is not None
        if helper.stdout.readline().strip() != "ready":
            raise SystemExit("socket helper did not start")
        bootstrap = "-"
        if not args.no_kafka:
            sys.path.insert(0, str(ROOT))
            from gpusentry.broker import BrokerUnavailable, EmbeddedBroker, create_topics

            try:
                broker = EmbeddedBroker().start()
                create_topics(broker.bootstrap_servers, ["gpusentry.gpu", "gpusentry.process", "gpusentry.network",
                                                         "gpusentry.dns"])
                bootstrap = broker.bootstrap_servers
            except BrokerUnavailable as exc:
                print(f"(no embedded broker: {exc}; events go to /dev/null)")
        env = {"BENCH_PIDS": ",".join(str(p.pid) for p in sleepers[:16]), "BENCH_SOCKET_HELPER": SOCKET_HELPER}
        if args.scheduler == "kubernetes":
            kubelet, env["BENCH_SCHEDULER"] = start_kubelet(Path(node_dir.name))
            print("scheduler: kubernetes (a fake kubelet in its own process, 8 pods with one GPU each, read every "
                  "5 s; a pod cgroup tree walked each time)")
        baseline = run_child(BASELINE_CHILD)
        print(f"baseline  bare pass over /proc ({baseline['processes']} processes): "
              f"{baseline['cpu_s'] * 1000:.2f} ms CPU, peak RSS {baseline['peak_rss_mb']:.1f} MB")
        modes = ["privileged", "unprivileged"] if os.geteuid() == 0 else ["unprivileged"]
        if os.geteuid() == 0 and shutil.which("ip"):
            modes.append("isolated")
        for mode in modes:
            with tempfile.TemporaryDirectory() as spool:
                r = run_child(AGENT_CHILD, str(ROOT), str(args.cycles), str(args.interval), bootstrap, spool, mode,
                              env=env)
            share = r["cycle_cpu_s"] / args.interval
            what = {"privileged": "capture on", "unprivileged": "capture off",
                    "isolated": "capture on, in a private network namespace with only the benchmark's sockets "
                                "(other tenants' flows and packets invisible), events to /dev/null"}[mode]
            print(f"agent     {mode:12s} (process source {r['process_source']}, {what}):")
            print(f"  steady cycle: {r['cycle_cpu_s'] * 1000:.2f} ms CPU = {r['cycle_cpu_s'] / baseline['cpu_s']:.2f}x "
                  f"the bare pass; {r['events_per_cycle']:.1f} events/cycle")
            parts = ", ".join(f"{k} {v:.2f} ms" for k, v in r["per_collector_ms"].items())
            print(f"  of which the cycle itself (main thread) {r['main_thread_cycle_s'] * 1000:.2f} ms: {parts}; "
                  f"the rest is the netlink/capture reader threads and the Kafka client")
            others = {k: v for k, v in r["threads_s"].items() if k != "python"}
            if others:
                print("  other threads over the run, % of one core: " + ", ".join(
                    f"{k} {v / r['wall_s'] * 100:.2f} %" for k, v in sorted(others.items())))
            threads = sum(v for k, v in r["threads_s"].items() if k != "python") / r["wall_s"]
            print(f"  share of one core at {args.interval:g} s: {share * 100:.2f} % per cycle, "
                  f"{(share + threads) * 100:.2f} % steady state with the reader threads (target < 1 %), "
                  f"{r['cpu_share_of_core'] * 100:.2f} % over the whole run incl. the first cycle")
            print(f"  first cycle (reports everything running): {r['first_cycle_cpu_s'] * 1000:.1f} ms CPU = "
                  f"{r['first_cycle_cpu_s'] / baseline['cpu_s']:.1f}x the bare pass, {r['first_cycle_events']} events")
            print(f"  peak RSS {r['peak_rss_mb']:.1f} MB = {r['peak_rss_mb'] / baseline['peak_rss_mb']:.2f}x the bare "
                  f"pass's interpreter (target < 80 MB)")
    finally:
        for p in sleepers:
            p.kill()
        for p in sleepers:
            p.wait()
        helper.kill()
        helper.wait()
        if broker is not None:
            broker.stop()
        if kubelet is not None:
            kubelet.kill()
            kubelet.wait()
        node_dir.cleanup()


def start_kubelet(root: Path) -> tuple[subprocess.Popen[str], str]:
    """A fake kubelet serving 8 pods (one GPU each), a pod log directory and a cgroup tree for them."""
    pods = []
    for i in range(N_GPUS):
        uid = f"00000000-0000-4000-8000-{i:012d}"
        pods.append(["bench", f"trainer-{i}", [["main", [["nvidia.com/gpu", [f"GPU-{i}"]]]]]])
        (root / "pods" / f"bench_trainer-{i}_{uid}" / "main").mkdir(parents=True)
        (root / "cgroup" / "kubepods.slice" / "kubepods-burstable.slice"
         / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice").mkdir(parents=True)
    (root / "pods.json").write_text(json.dumps(pods))
    sock = root / "kubelet.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_kubelet", str(sock), str(root / "pods.json")],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the fake kubelet did not start")
    return proc, json.dumps({"mode": "kubernetes", "kubelet_socket": str(sock), "cgroup_root": str(root / "cgroup"),
                             "pod_logs_dir": str(root / "pods")})


if __name__ == "__main__":
    main()
