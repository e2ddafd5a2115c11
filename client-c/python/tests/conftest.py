import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
# Test the build scripts/test.sh just made (debug), not whatever else lies
# around: ferryd and libferry.so from the same directory.
BIN_DIR = pathlib.Path(os.environ.get("FERRY_BIN_DIR", ROOT / "target" / "debug"))
os.environ.setdefault("FERRY_LIB", str(BIN_DIR / "libferry.so"))
sys.path.insert(0, str(ROOT / "client-c" / "python"))


def _bin(name):
    if (BIN_DIR / name).exists():
        return BIN_DIR / name
    pytest.fail(f"{BIN_DIR / name} not built: run `cargo build --workspace` (scripts/test.sh does)")


class Daemon:
    def __init__(self, extra=""):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ferry-py-"))
        self.socket = self.dir / "ferryd.sock"
        self.admin = self.dir / "ferryd-admin.sock"
        cfg = self.dir / "ferryd.toml"
        cfg.write_text(f'version = 1\n[daemon]\nsocket = "{self.socket}"\n{extra}\n')
        self.log = open(self.dir / "ferryd.log", "w")
        self.proc = subprocess.Popen([str(_bin("ferryd")), "--config", str(cfg)], stderr=self.log)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.socket.exists() and self.admin.exists():
                return
            time.sleep(0.01)
        raise RuntimeError("ferryd did not start: " + (self.dir / "ferryd.log").read_text())

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon():
    d = Daemon()
    yield d
    d.stop()
