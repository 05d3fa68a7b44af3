"""tools/setup.sh, the README's set-up command: each path through it, on stub commands.

The script is copied into a scratch checkout and run with a PATH holding only stubs that log their
arguments (id, dpkg-query, apt-get, sudo, python3 and the venv's python), so nothing is installed.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "setup.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

STUB = """#!{bash}
echo "{name} $*" >> "$STUB_LOG"
{body}
"""
BODIES = {
    "id": 'echo "$STUB_UID"',
    "dpkg-query": '[ -n "${STUB_INSTALLED:-}" ] && echo "install ok installed"; exit 0',
    "apt-get": 'exit "${STUB_APT_EXIT:-0}"',
    "sudo": 'exec "$@"',
    # python3 -m venv DIR makes DIR/bin/python, itself a stub
    "python3": """case "$1" in
  -V) echo "Python 3.11.7" ;;
  -c) exit 0 ;;
  -m) mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; sed -i 's/^echo "python3 /echo "venv-python /' "$3/bin/python" ;;
esac""",
}


def run_setup(tmp_path: Path, *args: str, uid: int = 0, without: tuple = (), **env: str):
    """Run a copy of tools/setup.sh; returns (exit code, output, the stub calls in order)."""
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPT, checkout / "tools" / "setup.sh")
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("dirname", "grep", "env", "mkdir", "cp", "sed"):
        if not (stubs / name).exists():
            (stubs / name).symlink_to(shutil.which(name))
    for name, body in BODIES.items():
        path = stubs / name
        if name in without:
            path.unlink(missing_ok=True)
            continue
        path.write_text(STUB.format(bash=BASH, name=name, body=body))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    log.write_text("")
    environment = {"PATH": str(stubs), "STUB_LOG": str(log), "STUB_UID": str(uid), **env}
    done = subprocess.run(
        [BASH, str(checkout / "tools" / "setup.sh"), *args], env=environment, capture_output=True, text=True, timeout=60
    )
    calls = [line for line in log.read_text().splitlines() if not line.startswith(("id", "dpkg-query"))]
    return done.returncode, done.stdout + done.stderr, calls


PIP = "venv-python -m pip install -e .[test]"


def test_as_root_installs_the_data_then_the_venv(tmp_path):
    code, out, calls = run_setup(tmp_path, uid=0)
    assert code == 0, out
    assert calls == [
        "apt-get update -q",
        "apt-get install -y -q dataset-fashion-mnist",
        "python3 -c import sys; sys.exit(sys.version_info < (3, 10))",
        "python3 -V",
        "python3 -m venv .venv",
        PIP,
    ]


def test_as_a_user_goes_through_sudo(tmp_path):
    code, out, calls = run_setup(tmp_path, uid=1000)
    assert code == 0, out
    assert calls[:4] == [
        "sudo apt-get update -q",
        "apt-get update -q",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist",
        "apt-get install -y -q dataset-fashion-mnist",
    ]
    assert calls[-1] == PIP


def test_a_user_without_sudo_is_told_what_to_do(tmp_path):
    code, out, calls = run_setup(tmp_path, uid=1000, without=("sudo",))
    assert code == 1
    assert "apt-get install -y dataset-fashion-mnist" in out and "--no-data" in out
    assert calls == []  # nothing half-done


def test_without_apt_the_data_is_left_to_torchvision(tmp_path):
    code, out, calls = run_setup(tmp_path, without=("apt-get", "dpkg-query"))
    assert code == 0, out
    assert "downloads it with torchvision" in out and "--data-dir" in out
    assert calls[-1] == PIP and not any(c.startswith("apt-get") for c in calls)


def test_failed_apt_get_stops_before_the_venv(tmp_path):
    code, out, calls = run_setup(tmp_path, STUB_APT_EXIT="100")
    assert code == 1
    assert "apt-get update failed" in out
    assert calls == ["apt-get update -q"]


def test_running_again_keeps_what_is_there(tmp_path):
    assert run_setup(tmp_path)[0] == 0
    code, out, calls = run_setup(tmp_path, STUB_INSTALLED="1")
    assert code == 0, out
    assert "dataset-fashion-mnist is installed" in out and not any(c.startswith("apt-get") for c in calls)
    assert "python3 -m venv .venv" not in calls  # .venv exists: kept
    assert calls[-1] == PIP  # pip install is itself idempotent


def test_no_data_option_and_a_bad_option(tmp_path):
    code, out, calls = run_setup(tmp_path, "--no-data")
    assert code == 0, out
    assert not any(c.startswith("apt-get") for c in calls)
    code, out, calls = run_setup(tmp_path, "--nodata")
    assert code == 1 and "usage: bash tools/setup.sh [--no-data]" in out and calls == []


def test_too_old_python_is_named(tmp_path):
    stubs = tmp_path / "bin"
    run_setup(tmp_path, "--no-data")  # lays out the stubs
    old = stubs / "python3.8"
    old.write_text(f'#!{BASH}\n[ "$1" = -V ] && echo \'Python 3.8.10\'; [ "$1" = -c ] && exit 1; exit 0\n')
    old.chmod(0o755)
    code, out, _ = run_setup(tmp_path, "--no-data", PYTHON="python3.8")
    assert code == 1 and "needs Python >= 3.10; python3.8 is Python 3.8.10" in out


def test_the_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
