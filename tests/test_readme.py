"""The README's commands run as written on a fresh clone, in the order given: every command of its
shell blocks (and every inline `.venv/bin/...` command) names an executable that exists once the
project is installed, with subcommands and options that exist, reading files that are in the repo
or made by an earlier command; `make` targets exist; the Python snippet joins the running cluster.
Nothing long is run: the CLI's own commands are parsed by its real parser with the commands
stubbed out, other tools answer `--help`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import deployments.cli as cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
# The environment the README's `.venv/bin/...` names: the repo's own (make creates it), else the one
# running the tests (the same console scripts are installed there).
BIN = ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin").is_dir() else Path(sys.executable).parent
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)
SHELL_BLOCKS = [body for lang, body in BLOCKS if lang in ("bash", "sh", "shell")]
PYTHON_BLOCKS = [body for lang, body in BLOCKS if lang == "python"]
INLINE = [m for m in re.findall(r"`([^`\n]+)`", README) if re.match(r"\.venv/bin/[\w-]+", m)]

SEPARATORS = {";", "&", "&&", "||", "|", "(", ")", ";;"}
KEYWORDS = {"until", "while", "do", "done", "if", "then", "else", "elif", "fi", "!", "time", "{", "}"}
REDIRECT = re.compile(r"^\d*(?:<|>|>>|<<|>&|&>)$")
OUTPUT_OPTIONS = {"-o", "--output"}  # their values are files a command writes
FILE = re.compile(r"^[\w./-]+\.(?:png|jpg|wav|mp3|mp4|yaml|yml|json)$")


def commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script, as word lists without env assignments, redirections,
    keywords and comments."""
    out: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        cmd: list[str] = []
        tokens = list(lex)
        skip = False
        for token in tokens:
            if skip:
                skip = False
            elif token in SEPARATORS:
                out += [cmd] if cmd else []
                cmd = []
            elif REDIRECT.match(token):
                skip = True  # its target
            elif not cmd and (token in KEYWORDS or re.match(r"^[A-Za-z_]\w*=", token)):
                continue
            else:
                cmd.append(token)
        out += [cmd] if cmd else []
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):(?!=)", MAKEFILE, re.M))


def cli_parse(argv: list[str], monkeypatch) -> object:
    """`avatar-serve ARGV` through the CLI's real parser, its commands replaced by a recorder."""
    seen = []
    for name in dir(cli):
        if name.startswith("cmd_"):
            monkeypatch.setattr(cli, name, lambda args, seen=seen: seen.append(args) or 0)
    try:
        assert cli.main(argv) == 0
    except SystemExit as exc:  # argparse refused it
        raise AssertionError(f"avatar-serve {shlex.join(argv)}: the CLI refuses it (exit {exc.code})") from None
    return seen[0]


def demo_outputs(argv: list[str], monkeypatch) -> set[str]:
    """The files `avatar-serve demo ARGV` writes (deployments/cli/demo.py, cmd_demo: the clip, and
    beside it its inputs and the talk turn)."""
    out = Path(cli_parse(argv, monkeypatch).output)
    return {str(out)} | {str(out.with_name(f"{out.stem}-{part}")) for part in ("portrait.png", "speech.wav",
                                                                               "talk.mp4")}


def makefile_cli_calls() -> dict[str, list[list[str]]]:
    """target -> the `avatar-serve` calls of its recipe."""
    calls: dict[str, list[list[str]]] = {}
    target = None
    for line in MAKEFILE.splitlines():
        m = re.match(r"^([\w.-]+):(?!=)", line)
        if m:
            target = m.group(1)
        elif line.startswith("\t") and target and "avatar-serve" in line:
            words = shlex.split(line.replace("$(BIN)/", ""))
            calls.setdefault(target, []).append(words[words.index("avatar-serve") + 1:])
    return calls


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every command the README asks to run, in order."""
    found = [(f"shell block {i + 1}", cmd) for i, block in enumerate(SHELL_BLOCKS) for cmd in commands(block)]
    return found + [("inline", cmd) for span in INLINE for cmd in commands(span)]


def test_the_readme_has_the_blocks_this_test_reads():
    assert len(SHELL_BLOCKS) >= 2 and PYTHON_BLOCKS
    words = {cmd[0] for _, cmd in all_commands()}
    assert {"make", ".venv/bin/serve", ".venv/bin/avatar-serve", ".venv/bin/ray"} <= words, words


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[f"block{i + 1}" for i in range(len(SHELL_BLOCKS))])
def test_shell_blocks_are_valid_bash(block):
    r = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_every_command_names_an_executable_that_exists_after_install():
    activated = False
    for where, cmd in all_commands():
        word = cmd[0]
        if word == "source" or word == ".":
            activated |= cmd[1:] == [".venv/bin/activate"]
            assert (BIN / "activate").exists() or cmd[1] != ".venv/bin/activate"
        elif word.startswith(".venv/bin/"):
            exe = BIN / word.removeprefix(".venv/bin/")
            assert exe.is_file() and os.access(exe, os.X_OK), f"{where}: {word} is not installed ({exe})"
        elif (BIN / word).exists() and shutil.which(word, path=os.defpath) is None:
            # a venv console script named bare: "command not found" in a fresh shell
            assert activated, f"{where}: `{word}` needs `.venv/bin/{word}` or `source .venv/bin/activate` first"
        else:
            kind = subprocess.run(["bash", "-c", f"type -t {shlex.quote(word)}"], capture_output=True, text=True)
            assert kind.stdout.strip() in ("builtin", "keyword", "file"), f"{where}: `{word}` is not on this machine"


def test_make_targets_exist():
    targets = make_targets()
    used = [arg for _, cmd in all_commands() if cmd[0] == "make" for arg in cmd[1:]
            if not arg.startswith("-") and "=" not in arg]
    assert used, "the README names no make target"
    for target in used:
        assert target in targets, f"make {target}: no such target in the Makefile ({sorted(targets)})"


def test_cli_commands_parse_and_read_files_that_exist_by_then(monkeypatch):
    """Each `avatar-serve` command parses with the real CLI, and every file a command reads is in
    the repo or written by a command before it (`make demo` writes the demo's inputs)."""
    produced: set[str] = set()
    makefile_calls = makefile_cli_calls()
    checked = 0
    for where, cmd in all_commands():
        word, args = cmd[0], cmd[1:]
        if word == "make":
            for target in args:
                for call in makefile_calls.get(target, []):
                    if call and call[0] == "demo":
                        produced |= demo_outputs(call, monkeypatch)
            continue
        if word.endswith("avatar-serve"):
            cli_parse(args, monkeypatch)
            checked += 1
        for i, arg in enumerate(args):
            if i and args[i - 1] in OUTPUT_OPTIONS:
                produced.add(arg)
            elif FILE.match(arg) and not arg.startswith("http"):
                assert (ROOT / arg).exists() or arg in produced, \
                    f"{where}: {shlex.join(cmd)} reads {arg}, which neither the repo nor an earlier command has"
    assert checked >= 2


def test_cli_subcommands_answer_help():
    subs = sorted({cmd[1] for _, cmd in all_commands() if cmd[0].endswith("avatar-serve")}
                  | {call[0] for calls in makefile_cli_calls().values() for call in calls})
    assert {"generate", "speak", "demo"} <= set(subs)
    for sub in subs:
        r = subprocess.run([str(BIN / "avatar-serve"), sub, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage: avatar-serve " + sub in r.stdout, (sub, r.stdout, r.stderr)


@pytest.mark.slow  # each `ray` / `serve` command imports Ray first: seconds apiece
def test_other_venv_tools_know_their_subcommands_and_options():
    """`.venv/bin/serve run ...`, `.venv/bin/ray start --metrics-export-port=...`: the subcommand
    answers --help and lists every option the README gives it."""
    seen = set()
    for where, cmd in all_commands():
        if not cmd[0].startswith(".venv/bin/") or cmd[0].endswith("avatar-serve") or len(cmd) < 2:
            continue
        exe, sub = BIN / cmd[0].removeprefix(".venv/bin/"), cmd[1]
        options = sorted({a.split("=", 1)[0] for a in cmd[2:] if a.startswith("--")})
        if (exe.name, sub, tuple(options)) in seen:
            continue
        seen.add((exe.name, sub, tuple(options)))
        r = subprocess.run([str(exe), sub, "--help"], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        assert r.returncode == 0, f"{where}: {exe.name} {sub} --help: {r.stderr[-2000:]}"
        for option in options:
            assert option in r.stdout, f"{where}: `{exe.name} {sub}` has no option {option}"
    assert {("serve", "run"), ("ray", "start")} <= {(name, sub) for name, sub, _ in seen}


def test_python_snippet_joins_the_running_cluster():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app_names = {a["name"] for a in config["applications"]}
    for src in PYTHON_BLOCKS:
        compile(src, "README.md", "exec")
        if "serve.get_app_handle" in src:
            assert 'ray.init(address="auto")' in src, "a new process must join the cluster, not start one"
            assert src.index("ray.init(") < src.index("serve.get_app_handle")
            assert set(re.findall(r'get_app_handle\("([^"]+)"\)', src)) <= app_names
        for path in re.findall(r'open\("([^"]+)"', src):
            assert (ROOT / path).exists() or path.startswith("out/demo-"), path  # out/demo-*: make demo


def test_metric_names_are_as_prometheus_shows_them():
    """Ray exports a metric NAME as ray_NAME: the README names them so, and each exists."""
    defined = set(re.findall(r'"(avatar_serve_\w+)"', (ROOT / "deployments/common/metrics.py").read_text()))
    assert defined
    named = re.findall(r"\b([a-z_]*avatar_serve_\w+)", README)
    assert len(set(named)) >= len(defined)  # every metric is listed
    for name in named:
        assert name.startswith("ray_avatar_serve_"), f"{name}: Prometheus shows it as ray_{name}"
        base = re.sub(r"_(bucket|sum|count)$", "", name.removeprefix("ray_"))
        assert base in defined, f"{name} is not a metric of deployments/common/metrics.py"
    assert "--metrics-export-port" in README and "/metrics" in README  # where to scrape them
