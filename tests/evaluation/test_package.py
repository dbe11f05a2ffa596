"""The offline harness is its own package: serving code never loads it; ``icecache eval`` does."""

import subprocess
import sys


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_servers_and_generate_never_import_the_harness():
    code = (
        "import sys, worker.cli, worker.serving.server, worker.scheduler, cache_service.server\n"
        "try:\n"
        "    worker.cli.main(['generate', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'evaluation')\n"
        "print('LOADED', loaded)\n"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_icecache_lists_eval_and_loads_it_when_asked():
    listing = _run("-m", "worker.cli", "--help")
    assert listing.returncode == 0 and "eval" in listing.stdout
    help_ = _run("-m", "worker.cli", "eval", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--allow-extrapolation" in help_.stdout and "--prefill-cache" in help_.stdout
