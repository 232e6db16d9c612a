"""A real PACS and a real `cxr listen` on loopback, for the PACS tests and benchmarks/bench_pacs.py.

`Orthanc` runs Debian's `orthanc` package with a throw-away configuration and storage folder on free ports and
drives it through its REST API; `Listener` runs `cxr listen` in a subprocess.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ORTHANC_AET = "ORTHANC"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "pacs.md"


def routing_script():
    """The Lua script docs/pacs.md gives for routing every new radiograph from Orthanc to cxr."""
    return DOCS.read_text().split("```lua\n")[1].split("```")[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process):
    """SIGTERM, then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def orthanc_binary():
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
USER = ("cxr", "a-test-password")  # Orthanc's one user when it asks for HTTP basic authentication


class Orthanc:
    """Orthanc on free loopback ports, storing into `folder`, with cxr (`cxr_port`, AE title CXR) as a modality;
    `lua`: the text of a Lua script for it to run (docs/pacs.md's routing script, say); `dicomweb`: with its
    DICOMweb plugin at `dicomweb_url`, asking for HTTP basic authentication (USER) on every request; `settings`:
    further configuration."""

    def __init__(self, folder, cxr_port, cxr_aet="CXR", lua=None, dicomweb=False, settings=None):
        self.folder = Path(folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.session = requests.Session()
        config = {
            "Name": "cxr-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"cxr": [cxr_aet, "127.0.0.1", cxr_port]}, "Plugins": [],
            "DicomScuTimeout": 30, "StableAge": 60, "SaveJobs": False,
        }
        if dicomweb:
            config |= {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                       "AuthenticationEnabled": True, "RegisteredUsers": {USER[0]: USER[1]}}
            self.session.auth = USER
        config |= settings or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        if lua is not None:
            (self.folder / "route.lua").write_text(lua)
            config["LuaScripts"] = [str(self.folder / "route.lua")]
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([orthanc_binary(), str(self.folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.session.get(f"{self.url}/system", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)

    @property
    def destination(self):
        """Orthanc as `cxr listen --send-to` takes it."""
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def get(self, path):
        answer = self.session.get(f"{self.url}{path}", timeout=60)
        answer.raise_for_status()
        return answer

    def post(self, path, **kwargs):
        answer = self.session.post(f"{self.url}{path}", timeout=120, **kwargs)
        answer.raise_for_status()
        return answer

    def upload(self, data):
        """Store a DICOM file's bytes; Orthanc's answer ({"ID", "ParentStudy", ...})."""
        return self.post("/instances", data=data).json()

    def send_to_cxr(self, instance_ids):
        """C-STORE the instances to cxr, waiting for the answer (Orthanc's job fails if cxr refuses one)."""
        return self.post("/modalities/cxr/store", json={"Resources": list(instance_ids), "Synchronous": True}).json()

    def echo_cxr(self):
        """True when cxr answers Orthanc's C-ECHO."""
        return self.session.post(f"{self.url}/modalities/cxr/echo", json={}, timeout=60).status_code == 200

    def series_of_study(self, study_id):
        """[{"ID", "MainDicomTags", "Instances", ...}] of every series in the study."""
        return [self.get(f"/series/{s}").json() for s in self.get(f"/studies/{study_id}").json()["Series"]]

    def wait_for_series(self, study_id, count, timeout=120):
        """The study's series once it has `count` of them (AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.series_of_study(study_id)
            if len(series) >= count:
                return series
            assert time.monotonic() < deadline, f"the study has {len(series)} series after {timeout} s, not {count}"
            time.sleep(0.1)

    def instance_file(self, instance_id):
        return self.get(f"/instances/{instance_id}/file").content

    def stop(self):
        stop(self.process)
        self.log.close()


class Listener:
    """`cxr listen` in a subprocess on a free port, started once it says it is ready; `stderr` once stopped.
    It runs in the test's own folder (conftest's isolated_run), where its default ./cxr-listen/ goes, with the
    suite's LiteRT cache."""

    def __init__(self, model, port=None, send_to=None, output_dir=None, extra=(), env=None):
        self.port = port or free_port()
        command = [sys.executable, "-m", "cxr", "listen", "--model", str(Path(model).resolve()), "--port",
                   str(self.port), *extra]
        command += ["--send-to", send_to] if send_to else []
        command += ["--output-dir", str(output_dir)] if output_dir else []
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}),
                                        bufsize=1)
        self.lines = []
        deadline = time.monotonic() + 180
        while True:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("cxr listen stopped before it was ready:\n" + "".join(self.lines)[-3000:])
            self.lines.append(line)
            if "cxr listen: ready" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("cxr listen was not ready in 180 s:\n" + "".join(self.lines)[-3000:])
        import threading

        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self):
        return "".join(self.lines)

    def wait_for_log(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.process.poll() is None, f"cxr listen stopped:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{self.stderr[-3000:]}"
            time.sleep(0.1)

    def stop(self):
        stop(self.process)
        return self.stderr
