"""Every code block of the README and the docs guides runs, in order, page by page.

The convention (docs/development/testing.md, "Code blocks in the docs"):
- ```python blocks run in one namespace per page; ```bash blocks run with `bash -e -o pipefail`
  as they are written (no `$ ` prompts); both in a fresh temporary folder per page, with
  `$MODEL` (and `os.environ["MODEL"]`) naming a tiny random checkpoint this test builds once.
- ```text (and other non-code languages: json, yaml, ...) are shown, never run. A fence without a
  language is an error: say what it is.
- `<!-- docs-test: skip (REASON) -->` on the line right above a fence: not run here, listed and
  counted by `test_skipped_blocks_are_listed`. The reason is required.
- `<!-- docs-test: background -->` above a ```bash block: started in the background (a server);
  the next block waits until `http://127.0.0.1:PORT/health` answers 200 (bounded), and the
  process is stopped (SIGTERM, then SIGKILL) when the page ends.
- Every `8080` in a page's code is replaced by a free port of 127.0.0.1.
The README's and the fine-tuning page are marked slow: `python -m pytest -m slow tests/test_docs.py`.
Any other `docs-test:` marker is an error.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md"]
    + [p for p in (ROOT / "docs").rglob("*.md") if "api" not in p.relative_to(ROOT / "docs").parts]
)
RUN = {"python", "bash"}
SHOWN = {"text", "json", "yaml", "toml", "http", "dockerfile"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip \((?P<reason>[^()]*\S[^()]*)\)$")
SERVER_WAIT_S = 300
BLOCK_TIMEOUT_S = 300


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # "run", "background", "skip", "shown"
    reason: str = ""


def parse(text: str, page: str) -> list[Block]:
    """The fenced blocks of a markdown page, with their docs-test marker applied.

    Raises ValueError naming page:line for an unknown or malformed marker, a marker not followed
    by a fence, a fence without a language, an unclosed fence, or a `$ ` prompt in a bash block."""
    lines = text.split("\n")
    blocks, marker, i = [], None, 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            body = m.group("body")
            skip = SKIP.match(body)
            if body == "background":
                marker = ("background", "")
            elif skip:
                marker = ("skip", skip.group("reason").strip())
            else:
                raise ValueError(
                    f"{page}:{i + 1}: unknown docs-test marker {body!r} (want "
                    "'skip (REASON)' or 'background')"
                )
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{page}:{i + 1}: a docs-test marker must sit right above a fence")
            i += 1
            continue
        f = FENCE.match(lines[i])
        if not f:
            i += 1
            continue
        indent, lang, start = f.group("indent"), f.group("lang"), i
        if not lang:
            raise ValueError(f"{page}:{i + 1}: a fence needs a language (text for output)")
        body, i = [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i >= len(lines):
            raise ValueError(f"{page}:{start + 1}: unclosed fence")
        i += 1
        code = "\n".join(body) + "\n"
        if lang not in RUN and lang not in SHOWN:
            raise ValueError(f"{page}:{start + 1}: unknown fence language {lang!r}")
        if lang == "bash" and any(re.match(r"\s*\$ ", ln) for ln in body):
            raise ValueError(f"{page}:{start + 1}: no `$ ` prompts in bash blocks (they run)")
        mode, reason = marker or (("run", "") if lang in RUN else ("shown", ""))
        if mode == "background" and lang != "bash":
            raise ValueError(f"{page}:{start + 1}: only a bash block can run in the background")
        if mode != "shown" and lang not in RUN:
            raise ValueError(f"{page}:{start + 1}: a docs-test marker on a {lang} block")
        blocks.append(Block(page, start + 1, lang, code, mode, reason))
        marker = None
    return blocks


def page_blocks(path: Path) -> list[Block]:
    return parse(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, where: str):
    deadline = time.monotonic() + SERVER_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{where}: the background command exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{where}: no healthy server on port {port} within {SERVER_WAIT_S} s")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def docs_model(tmp_path_factory):
    """A small random release-format checkpoint (2 layers, 256 wide, so that the examples'
    `truncate_dim=256` and `"dimensions": 256` hold): every page's `$MODEL`."""
    from convert.random_checkpoint import write_random_release
    from jina_jax.config import JinaConfig

    folder = str(tmp_path_factory.mktemp("docs-model") / "tiny")
    cfg = JinaConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
    )
    write_random_release(folder, cfg, dtype="float32")
    return folder


# --- the convention itself -----------------------------------------------------------------


def test_parser_runs_python_and_bash_and_shows_text():
    text = "```python\nx = 1\n```\n```text\nout\n```\n```bash\necho hi\n```\n"
    got = [(b.lang, b.mode, b.code) for b in parse(text, "p.md")]
    assert got == [("python", "run", "x = 1\n"), ("text", "shown", "out\n"), ("bash", "run", "echo hi\n")]


def test_parser_markers():
    text = (
        "<!-- docs-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n"
        "<!-- docs-test: background -->\n```bash\njina-jax serve\n```\n"
        "- item\n  ```python\n  y = 2\n  ```\n"
    )
    got = [(b.mode, b.reason, b.code) for b in parse(text, "p.md")]
    assert got == [("skip", "needs a GPU", "nvidia-smi\n"), ("background", "", "jina-jax serve\n"), ("run", "", "y = 2\n")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- docs-test: skip -->\n```bash\nx\n```\n", "unknown docs-test marker 'skip'"),
        ("<!-- docs-test: skip () -->\n```bash\nx\n```\n", "unknown docs-test marker"),
        ("<!-- docs-test: later -->\n```bash\nx\n```\n", "unknown docs-test marker 'later'"),
        ("<!-- docs-test: skip (why) -->\n\n```bash\nx\n```\n", "right above a fence"),
        ("```\nx\n```\n", "needs a language"),
        ("```python\nx\n", "unclosed fence"),
        ("```bash\n$ ls\n```\n", "no `$ ` prompts"),
        ("<!-- docs-test: background -->\n```python\nx\n```\n", "only a bash block"),
        ("<!-- docs-test: skip (why) -->\n```text\nx\n```\n", "marker on a text block"),
        ("```rust\nfn main() {}\n```\n", "unknown fence language 'rust'"),
    ],
)
def test_parser_refuses(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text, "p.md")


def test_skipped_blocks_are_listed():
    """Every block that cannot run here, with its page, line and reason (see `-s`)."""
    skipped = [b for p in PAGES for b in page_blocks(p) if b.mode == "skip"]
    ran = [b for p in PAGES for b in page_blocks(p) if b.mode in ("run", "background")]
    print(f"\ndocs code blocks: {len(ran)} run, {len(skipped)} skipped")
    for b in skipped:
        print(f"  {b.page}:{b.line} ({b.lang}): {b.reason}")
    assert ran, "no runnable code block found in the docs"
    assert all(b.reason for b in skipped)


# --- the pages -----------------------------------------------------------------------------


def run_python(block: Block, namespace: dict, where: str):
    code = compile(block.code, where, "exec")
    exec(code, namespace)  # noqa: S102 - the docs' own examples


def run_bash(block: Block, cwd: Path, env: dict, where: str):
    r = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert r.returncode == 0, f"{where} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


# Minutes on 2 cores, so they run with the slow checks (CI runs both): the README's five-minute
# path writes, loads and serves a checkpoint at the released widths (2 layers, 1 GB in fp32);
# fine-tuning compiles two train steps and runs `jina-jax finetune`.
SLOW_PAGES = {ROOT / "README.md", ROOT / "docs" / "guides" / "fine-tuning.md"}


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=[pytest.mark.slow] if p in SLOW_PAGES else []) for p in PAGES],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_page_code_runs(page, docs_model, tmp_path, monkeypatch):
    blocks = [b for b in page_blocks(page) if b.mode in ("run", "background")]
    if not blocks:
        return
    port = free_port()
    for b in blocks:
        b.code = b.code.replace("8080", str(port))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL", docs_model)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MODEL=docs_model, PYTHONPATH=pythonpath)
    namespace: dict = {"__name__": "__docs__"}
    background: list[subprocess.Popen] = []
    try:
        for b in blocks:
            where = f"{b.page}:{b.line}"
            if background and background[-1].poll() is None and not getattr(
                background[-1], "healthy", False
            ):
                wait_healthy(port, background[-1], where)
                background[-1].healthy = True
            if b.mode == "background":
                log = open(tmp_path / f"background-{b.line}.log", "w")
                background.append(
                    subprocess.Popen(
                        ["bash", "-e", "-o", "pipefail", "-c", f"exec {b.code.strip()}"],
                        cwd=tmp_path,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            elif b.lang == "python":
                run_python(b, namespace, where)
            else:
                run_bash(b, tmp_path, env, where)
    finally:
        for proc in background:
            stop(proc)
