"""docs/fhir.md's quick start, run as written: its titled blocks (bash and Python files) are executed in
order against a real server with published reports, so the doc cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from clinic_db.models import AuditEvent, FhirClient
from fhir.smart import add_client
from inference.vocabulary import load_vocabulary
from tests.support import serve_app
from tests.test_fhir_support import make_case, make_clinician, sign
from tests.conftest import service_missing

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "fhir.md"
FENCE = re.compile(r'^```(?P<lang>\w+) title="(?P<title>[^"]+)"\n(?P<body>.*?)^```$', re.M | re.S)
QUICKSTART = ["make_jwks.py", "qs-keys", "qs-register", "make_assertion.py", "qs-token", "qs-search",
              "qs-patient", "qs-paging", "qs-read", "pull_reports.py", "qs-python"]
MARK = "@@@ example "


@dataclass(frozen=True)
class Example:
    lang: str
    title: str
    body: str


def examples() -> list[Example]:
    return [Example(m["lang"], m["title"], m["body"]) for m in FENCE.finditer(DOC.read_text(encoding="utf-8"))]


def test_quickstart_examples_are_all_there_in_a_runnable_order():
    found = examples()
    assert [e.title for e in found] == QUICKSTART
    assert {e.lang for e in found} == {"bash", "python"}
    shown: set[str] = set()
    for e in found:
        if e.lang == "python":
            shown.add(e.title)
            continue
        for script in re.findall(r"python3 (\S+\.py)", e.body):
            assert script in shown, f"{e.title} runs {script} before the doc shows it"
    run = {s for e in found if e.lang == "bash" for s in re.findall(r"python3 (\S+\.py)", e.body)}
    assert run == shown, "every Python file in the doc must be run by a shell step"
    # the registration step uses the CLI's real options
    register = next(e.body for e in found if e.title == "qs-register")
    options = {opt for p in add_client.params for opt in p.opts}
    assert set(re.findall(r"(--[a-z-]+)", register)) <= options


def _shim(bin_dir: Path) -> None:
    """`skinbridge` on PATH as a user has it, run from this checkout by this interpreter."""
    bin_dir.mkdir()
    shim = bin_dir / "skinbridge"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
                    f'exec "{sys.executable}" -m skinbridge "$@"\n')
    shim.chmod(0o755)


def _run_quickstart(base_url: str, workdir: Path, bin_dir: Path) -> dict[str, str]:
    """Save the Python files, run the shell steps in one bash session; output per step title."""
    script = ["set -euo pipefail"]
    for e in examples():
        if e.lang == "python":
            (workdir / e.title).write_text(e.body)
        else:
            script += [f"echo '{MARK}{e.title}'", e.body]
    env = dict(os.environ, BASE_URL=base_url,
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"quick start failed:\n{proc.stdout}\n{proc.stderr}"
    out: dict[str, str] = {}
    for chunk in proc.stdout.split(MARK)[1:]:
        title, _, text = chunk.partition("\n")
        out[title] = text
    return out


def test_quickstart_runs_against_a_real_server(clinic, tmp_path):
    missing = [tool for tool in ("openssl", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        service_missing(f"the quick start's tools ({', '.join(missing)})", "not on PATH")
    with clinic.session() as s:
        doctor = make_clinician(s)
        preliminary = [make_case(clinic, s, 901), make_case(clinic, s, 902)]
        final = [make_case(clinic, s, 903, name="Greta"), make_case(clinic, s, 904)]
        for case in final:
            sign(clinic, s, case, doctor, note="Please see us within 2 weeks.")
        amended = make_case(clinic, s, 905)
        sign(clinic, s, amended, doctor)
        sign(clinic, s, amended, doctor, decision="amend", condition_code="nevus", note="Histology: nevus.")
        ids = {"preliminary": {str(c.id) for c in preliminary}, "final": {str(c.id) for c in final},
               "amended": {str(amended.id)}}
        patient_of = {str(c.id): str(c.patient_id) for c in preliminary + final + [amended]}
    signed = ids["final"] | ids["amended"]
    workdir, bin_dir = tmp_path / "ehr", tmp_path / "bin"
    workdir.mkdir()
    _shim(bin_dir)

    from skinbridge.web import create_app

    with serve_app(create_app()) as base:
        out = _run_quickstart(base, workdir, bin_dir)
    assert list(out) == [t for t in QUICKSTART if not t.endswith(".py")]

    # 1. keys: the JWKS holds the public key only
    assert "kid=ehr-key-1" in out["qs-keys"]
    jwks = json.loads((workdir / "jwks.json").read_text())
    assert jwks["keys"][0]["kid"] == "ehr-key-1" and "d" not in jwks["keys"][0]

    # 2. the CLI registered the client with the doc's scopes
    client_id = re.fullmatch(r"client_id: (ehr-[0-9a-f]{16})\n", out["qs-register"])[1]  # type: ignore[index]
    with clinic.session() as s:
        client = s.scalar(select(FhirClient).where(FhirClient.client_id == client_id))
        assert client is not None and client.name == "Hospital A EHR" and client.active
        assert set(client.scopes) == {f"system/{t}.rs" for t in ("DiagnosticReport", "Observation", "Media",
                                                                  "Binary", "Patient")}

    # 3. token
    token = json.loads(out["qs-token"])
    assert token["token_type"] == "bearer" and token["expires_in"] == 300
    assert "system/DiagnosticReport.rs" in token["scope"].split()

    # 4. search with _include: the signed reports match, their observations and patients are included
    lines = [line.split() for line in out["qs-search"].splitlines()]
    matches = {ref.split("/")[1]: status for mode, ref, status in lines if mode == "match"}
    assert matches == {i: "final" for i in ids["final"]} | {i: "amended" for i in ids["amended"]}
    included = [ref.split("/")[0] for mode, ref, _ in lines if mode == "include"]
    assert included.count("Patient") == len(signed) and included.count("Observation") >= 2 * len(signed)

    patient_lines = out["qs-patient"].splitlines()
    assert len(patient_lines) == 1
    rid, status, conclusion = patient_lines[0].split(" ", 2)
    assert rid in signed and status in ("final", "amended") and conclusion.startswith("Dermatologist's assessment")

    # paging: every report exactly once, over three pages of two
    paged = [line.split() for line in out["qs-paging"].splitlines()]
    assert len(paged) == 5 and {r for r, _ in paged} == set(patient_of)
    assert {r: st for r, st in paged} == {r: st for st, group in ids.items() for r in group}

    # conditional read and the PDF
    read = out["qs-read"].splitlines()
    assert re.fullmatch(r'ETag: W/"[23]"', read[0]) and read[1] == "If-None-Match: 304"
    assert re.fullmatch(r"Teledermatology report: \d+ bytes", read[2])
    assert (workdir / "report.pdf").read_bytes().startswith(b"%PDF")

    # 5. Python: signed reports with the dermatologist's finding and PDF; preliminary ones flagged as such
    py = out["qs-python"]
    by = re.escape(f"signed by Practitioner/{doctor.id}")
    for rid in ids["final"]:  # the dermatologist accepted the AI's top candidate
        assert re.search(rf"^final {rid}: Melanoma \(final\), {by}$", py, re.M)
    nevus = re.escape(load_vocabulary().get("nevus").name("en"))  # the amendment's finding, not the first one
    assert re.search(rf"^amended {amended.id}: {nevus} \(final\), {by}$", py, re.M)
    assert len(re.findall(r"^  PDF [1-9]\d+ bytes$", py, re.M)) == len(signed)
    for rid in ids["preliminary"]:
        assert re.search(rf"^preliminary {rid}: Preliminary AI assessment - not a diagnosis", py, re.M)

    # what the doc's client did is in the audit trail under its own name
    with clinic.session() as s:
        actions = set(s.scalars(select(AuditEvent.action).where(AuditEvent.actor_type == "client",
                                                                AuditEvent.actor_id == client_id)))
    assert {"fhir.search", "fhir.read"} <= actions
