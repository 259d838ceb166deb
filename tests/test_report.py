"""The report and compare pages: files written, referenced, escaped, and really rendered by a
browser (headless Chromium driven over the DevTools protocol with a tiny stdlib websocket client,
so no new Python dependency)."""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from steprl.monitor import write_compare, write_report
from steprl.monitor.report import main_report

EVIL = "<script>alert('x')</script> & \"q\""


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def grpo_history(seed: int, kl=None, n: int = 100) -> list[dict]:
    """A healthy GRPO run (rising reward, KL in band), eval every 20 steps; `kl(u)` overrides KL."""
    rng, rows = np.random.default_rng(seed), []
    for i in range(n):
        u, noise = i / (n - 1), rng.normal(0, 1, 8)
        rows.append({"step": i, "reward": 0.2 + 0.6 * u + 0.05 * noise[0], "reward_std": 0.3,
                     "accuracy": 0.15 + 0.6 * u + 0.04 * noise[1],
                     "kl": kl(u) if kl else 0.01 + 0.05 * u + 0.003 * abs(noise[2]),
                     "entropy": 1.2 - 0.4 * u + 0.03 * noise[3], "loss": 0.05 * noise[4],
                     "completions/mean_length": 120 + 8 * noise[5], "completions/clipped_ratio": 0.03,
                     "tools/call_frequency": 0.8 + 0.04 * noise[6], "tools/failure_frequency": 0.1,
                     "frac_reward_zero_std": 0.2})
        if i % 20 == 19:
            rows.append({"step": i, "eval/accuracy": 0.15 + 0.55 * u})
    return rows


def sft_history(seed: int, n: int = 60) -> list[dict]:
    rng, rows = np.random.default_rng(seed), []
    for i in range(n):
        rows.append({"step": i, "loss": 0.6 + 1.4 * np.exp(-4 * i / (n - 1)) + 0.04 * rng.normal()})
        if i % 10 == 9:
            rows.append({"step": i, "eval/loss": 0.7 + 1.4 * np.exp(-4 * i / (n - 1))})
    return rows


def fake_run(run: Path, seed: int = 0, kl=None) -> Path:
    _jsonl(run / "grpo" / "metrics.jsonl", grpo_history(seed, kl))
    _jsonl(run / "sft" / "metrics.jsonl", sft_history(seed))
    (run / "summary.json").write_text(json.dumps({"stages": [
        {"name": "sft", "wall_seconds": 12.5, "eval": {"accuracy": 0.2, "n": 50}},
        {"name": "grpo", "wall_seconds": 80.0, "eval": {"accuracy": 0.61, "n": 50}}], "wall_seconds": 92.5}))
    _jsonl(run / "grpo" / "doctor.jsonl", [{"code": "entropy_collapse", "severity": "warning", "step": 70,
                                            "evidence": f"entropy fell {EVIL}", "advice": "raise kl_coef"}])
    seg = [{"text": f"What is 3*4? {EVIL}\n", "trained": False, "role": "prompt"},
           {"text": 'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}'
                    "</tool_call>", "trained": True, "role": "assistant"},
           {"text": "12 <done>", "trained": False, "role": "tool"},
           {"text": "The answer is 12.", "trained": True, "role": "assistant"}]
    _jsonl(run / "grpo" / "samples.jsonl",
           [{"step": s, "prompt": "What is 3*4?", "reward": float(s > 0), "segments": seg,
             "turn_rewards": [0.1, float(s > 0)], "correct": s > 0} for s in (0, 0, 0, 99, 99, 99, 99)])
    return run


def test_report_writes_referenced_pngs_and_escapes(tmp_path, capsys):
    run = fake_run(tmp_path / "demo")
    (run / "report_grpo_stale.png").write_bytes(b"old")  # left over from an older report
    assert main_report(run) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == run / "report.html"
    page = out.read_text()
    pngs = sorted(p.name for p in run.glob("report_*.png"))
    expected = {f"report_grpo_{k}.png" for k in ("reward", "kl", "accuracy", "entropy", "length", "tools")}
    assert set(pngs) == expected | {"report_sft_loss.png"}  # no RL loss plot, no empty SFT plots
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == pngs
    for p in pngs:
        assert (run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # escaping: hostile text shows up as text, never as markup; the page has no script at all
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "12 &lt;done&gt;" in page and "http://" not in page and "https://" not in page
    # samples: trained tokens, tool block, emphasised call; 2 early + 3 late trajectories
    assert page.count('class="traj"') == 5
    assert '<span class="trained">' in page and '<span class="lbl">tool</span>' in page
    assert '<span class="call">&lt;tool_call&gt;' in page
    # findings table (live finding from doctor.jsonl) and the eval table from summary.json
    assert "entropy_collapse" in page and "0.610" in page and "92.5 s" in page


def test_report_marks_post_hoc_findings_and_skips_missing(tmp_path):
    run = fake_run(tmp_path / "bad", kl=lambda u: 0.03 if u < 0.6 else 0.8)
    page = write_report(run).read_text()
    assert "kl_explosion" in page and 'class="sev critical"' in page
    bare = tmp_path / "bare"  # only metrics, no summary/samples/doctor/config
    _jsonl(bare / "pretrain" / "metrics.jsonl", [{"step": i, "loss": 4 - i / 10} for i in range(20)])
    page = write_report(bare).read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == ["report_pretrain_loss.png"]
    assert "No problems found" in page
    (tmp_path / "empty").mkdir()
    assert write_report(tmp_path / "empty").exists()


def test_compare_overlays_runs(tmp_path):
    a = fake_run(tmp_path / "runs" / "lr_low", seed=1)
    b = fake_run(tmp_path / "runs" / "lr_high", seed=2, kl=lambda u: 0.05 + 0.3 * u)
    out = write_compare([a, b])
    assert out == tmp_path / "runs" / "compare_lr_low_lr_high" / "compare.html"
    page = out.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert "compare_grpo_reward.png" in srcs and "compare_sft_loss.png" in srcs
    assert all((out.parent / s).exists() for s in srcs)
    assert "lr_low" in page and "0.610" in page


# ------------------------------------------------------------------ headless Chromium over CDP
class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: masked text frames out, frames in."""

    def __init__(self, url: str, timeout: float = 30):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("websocket closed")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, opcode: int, data: bytes) -> None:
        n, mask = len(data), os.urandom(4)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         struct.pack(">BH", 0x80 | 126, n) if n < 65536 else
                                         struct.pack(">BQ", 0x80 | 127, n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def send(self, obj) -> None:
        self._frame(0x1, json.dumps(obj).encode())

    def recv(self) -> dict:
        msg = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            op = b0 & 0x0F
            if op == 0x9:  # ping
                self._frame(0xA, data)
                continue
            if op == 0x8:
                raise EOFError("websocket closed by browser")
            msg += data
            if b0 & 0x80:
                return json.loads(msg)


class Browser:
    """One headless Chromium; `check(path)` loads a page and reports its images and errors."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-quic", "--remote-debugging-port=0"]

    def __init__(self, binary: str, profile: Path):
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited: {(profile.parent / 'chromium.log').read_text()}"
            assert time.time() < deadline, "chromium did not open its DevTools port within 30 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws, self.next_id, self.events = WebSocket(page["webSocketDebuggerUrl"]), 0, []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = self.ws.recv()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not any(e.get("method") == event for e in self.events):
            assert time.time() < deadline, f"no {event} within {timeout} s"
            self.events.append(self.ws.recv())

    def check(self, path: Path) -> tuple[list, list]:
        """Load `path`; return ([src, naturalWidth] per <img>, [error messages])."""
        self.events = []
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 200))", awaitPromise=True)
        res = self.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : 0])"))
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text", "log error"))
        return res["result"]["value"], errors

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def chromium_binary() -> str | None:
    for name in (os.environ.get("STEPRL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_headless_chromium(tmp_path, toy_run):
    if os.environ.get("STEPRL_SKIP_BROWSER") == "1":
        pytest.skip("STEPRL_SKIP_BROWSER=1")
    binary = chromium_binary()
    if binary is None:
        pytest.fail("headless Chromium not found: install it with "
                    "`apt-get update && apt-get install -y chromium chromium-driver` "
                    "(or set STEPRL_SKIP_BROWSER=1 to skip this test)")
    report = write_report(fake_run(tmp_path / "run"))
    compare = write_compare([tmp_path / "run", fake_run(tmp_path / "other", seed=3)])
    real = write_report(toy_run)  # a real run of the demo's pipeline, at toy size
    broken = tmp_path / "run" / "broken.html"  # control: the checker must see failures
    broken.write_text('<html><body><img src="missing.png"><script>console.error("boom")</script></body></html>')
    browser = Browser(binary, tmp_path / "profile")
    try:
        images, errors = browser.check(report)
        cmp_images, cmp_errors = browser.check(compare)
        real_images, real_errors = browser.check(real)
        bad_images, bad_errors = browser.check(broken)
    finally:
        browser.close()
    assert len(images) == len(list(report.parent.glob("report_*.png"))) == 7
    assert all(width > 0 for _, width in images), images
    assert errors == []
    assert len(cmp_images) == 7 and all(w > 0 for _, w in cmp_images) and cmp_errors == []
    assert sorted(src for src, _ in real_images) == sorted(
        f"report_{plot}.png" for plot in ["pretrain_loss", "sft_loss", "grpo_reward", "grpo_kl", "grpo_accuracy",
                                          "grpo_entropy", "grpo_length", "grpo_tools"])
    assert all(w > 0 for _, w in real_images) and real_errors == [], (real_images, real_errors)
    assert bad_images == [["missing.png", 0]] and any("boom" in e for e in bad_errors), bad_errors
