"""SMART Backend Services: registration, the token endpoint's refusals, scopes enforced per type,
and the fhirclient library authorising against a real server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from clinic_db.models import AuditEvent, FhirClient
from fhir.terms import condition
from fhir.smart import Scope, fhir_client_command, register_client
from tests.test_fhir_support import ec_key, make_case, rsa_key, serve_ehr


def _unsigned(claims: dict, header: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc(header)}.{enc(claims)}."


def _claims(ehr, **over):  # type: ignore[no-untyped-def]
    now = int(time.time())
    c = {"iss": ehr.client_id, "sub": ehr.client_id, "aud": ehr.token_url, "exp": now + 120, "jti": f"j{time.time_ns()}"}
    c.update(over)
    return c


def test_token_endpoint_issues_short_lived_scoped_tokens_and_refuses_bad_assertions(clinic):
    with serve_ehr(clinic, scopes=["system/DiagnosticReport.rs", "system/Patient.read"]) as ehr:
        config = httpx.get(ehr.fhir + "/.well-known/smart-configuration").json()
        assert config["token_endpoint"] == ehr.token_url
        assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]

        ok = ehr.token_response(scope="system/DiagnosticReport.rs system/Patient.read system/Observation.rs launch")
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["expires_in"] == 300 and body["token_type"] == "bearer"
        # only what the client was registered for is granted
        assert body["scope"].split() == ["system/DiagnosticReport.rs", "system/Patient.read"]

        def refused(assertion: str, expect: str = "invalid_client", **form: str) -> str:
            resp = ehr.token_response(assertion=assertion, **form)
            assert resp.status_code in (400, 401), resp.text
            assert resp.json()["error"] == expect, resp.text
            return resp.json()["error_description"]

        k = ehr.key
        assert "expired" in refused(k.assertion(ehr.client_id, ehr.token_url, exp=int(time.time()) - 120))
        assert "aud" in refused(k.assertion(ehr.client_id, ehr.base + "/somewhere-else"))
        assert "five minutes" in refused(k.assertion(ehr.client_id, ehr.token_url, exp=int(time.time()) + 3600))
        replayed = k.assertion(ehr.client_id, ehr.token_url, jti="once-only")
        assert ehr.token_response(assertion=replayed).status_code == 200
        assert "replay" in refused(replayed)
        assert "kid" in refused(k.assertion(ehr.client_id, ehr.token_url, _kid="not-registered"))
        assert "alg" in refused(_unsigned(_claims(ehr), {"alg": "none", "kid": k.kid, "typ": "JWT"}))
        # HS256 keyed with the public key (the classic algorithm-confusion attack) is refused
        unsigned = _unsigned(_claims(ehr), {"alg": "HS256", "kid": k.kid, "typ": "JWT"})[:-1]
        mac = hmac.new(json.dumps(k.public_jwk).encode(), unsigned.encode(), hashlib.sha256).digest()
        hs = unsigned + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        assert "alg" in refused(hs)
        # signed by a key that is not the registered one, under the registered kid
        impostor = rsa_key(kid=k.kid)
        assert "rejected" in refused(impostor.assertion(ehr.client_id, ehr.token_url))
        assert "unknown" in refused(rsa_key().assertion("ehr-nobody", ehr.token_url))
        refused(k.assertion(ehr.client_id, ehr.token_url), expect="invalid_scope", scope="system/Media.rs")
        refused(k.assertion(ehr.client_id, ehr.token_url), expect="unsupported_grant_type",
                grant_type="authorization_code")
        form = httpx.post(ehr.token_url, json={"grant_type": "client_credentials"})
        assert form.status_code == 400 and form.json()["error"] == "invalid_request"

    with clinic.session() as s:
        denied = s.scalars(select(AuditEvent).where(AuditEvent.action == "fhir.token",
                                                    AuditEvent.outcome == "denied")).all()
        assert len(denied) >= 10


def test_es384_client_and_scopes_enforced_per_resource_type(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 801)
    with serve_ehr(clinic, scopes=["system/DiagnosticReport.rs"], key=ec_key()) as ehr:
        headers = ehr.headers(scope="system/DiagnosticReport.rs")
        assert httpx.get(f"{ehr.fhir}/DiagnosticReport/{case.id}", headers=headers).status_code == 200
        forbidden = httpx.get(f"{ehr.fhir}/Patient/{case.patient_id}", headers=headers)
        assert forbidden.status_code == 403
        assert forbidden.headers["content-type"].startswith("application/fhir+json")
        assert forbidden.json()["issue"][0]["code"] == "forbidden"
        # an _include of a type the token may not read is left out, not leaked
        bundle = httpx.get(f"{ehr.fhir}/DiagnosticReport", params={"_include": "DiagnosticReport:subject"},
                           headers=headers).json()
        assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"DiagnosticReport"}
        # disabling the client stops its live tokens at once
        runner = CliRunner()
        assert runner.invoke(fhir_client_command, ["disable", ehr.client_id]).exit_code == 0
        after = httpx.get(f"{ehr.fhir}/DiagnosticReport/{case.id}", headers=headers)
        assert after.status_code == 401 and after.json()["resourceType"] == "OperationOutcome"


def test_v1_read_scope_and_token_tampering(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 802)
    with serve_ehr(clinic, scopes=["system/*.read"]) as ehr:
        token = ehr.token(scope="system/*.read")
        ok = httpx.get(f"{ehr.fhir}/Patient/{case.patient_id}", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        header, claims, sig = token.split(".")
        body = json.loads(base64.urlsafe_b64decode(claims + "=="))
        body["sub"] = "ehr-someone-else"
        forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode(), sig])
        bad = httpx.get(f"{ehr.fhir}/Patient/{case.patient_id}", headers={"Authorization": f"Bearer {forged}"})
        assert bad.status_code == 401 and "WWW-Authenticate" in bad.headers


def test_fhirclient_library_authorises_with_private_key_jwt_and_reads(clinic):
    from fhirclient import client
    from fhirclient.models.diagnosticreport import DiagnosticReport

    with clinic.session() as s:
        case = make_case(clinic, s, 803, name="Jana Novak")
    with serve_ehr(clinic) as ehr:
        smart = client.FHIRClient(settings={
            "app_id": ehr.client_id, "api_base": ehr.fhir + "/",
            "scope": "system/DiagnosticReport.rs system/Patient.rs system/Observation.rs",
            "jwt_token": ehr.key.assertion(ehr.client_id, ehr.token_url),
        })
        smart.wants_patient = False
        smart.prepare()  # reads /metadata and finds the token URL in the SMART security extension
        assert smart.server.auth.auth_type == "oauth2"
        smart.authorize()
        assert smart.ready
        reports = DiagnosticReport.where(struct={"patient": str(case.patient_id)}).perform_resources(smart.server)
        assert [r.id for r in reports] == [str(case.id)]
        report = reports[0]
        assert report.status == "preliminary"
        assert report.category[0].coding[0].code == "394582007"
        melanoma = condition("melanoma").snomed  # the SNOMED CT code the condition vocabulary gives
        assert melanoma and [(c.system, c.code) for c in report.conclusionCode[0].coding] == [
            ("http://snomed.info/sct", melanoma)]
        assert report.meta.security[0].code == "AIAST"


def test_registration_validates_keys_and_scopes(clinic, tmp_path):
    key = rsa_key()
    with pytest.raises(ValueError, match="read-only|unsupported"):
        register_client(clinic, "x", {"keys": [key.public_jwk]}, ["system/DiagnosticReport.cruds"])
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.private)) | {"kid": "p"}
    with pytest.raises(ValueError, match="private"):
        register_client(clinic, "x", {"keys": [private_jwk]}, ["system/*.rs"])
    with pytest.raises(ValueError, match="kid"):
        register_client(clinic, "x", {"keys": [{k: v for k, v in key.public_jwk.items() if k != "kid"}]},
                        ["system/*.rs"])
    assert Scope.parse("system/Observation.rs") == Scope("Observation", frozenset("rs"))
    assert Scope.parse("system/Observation.sr") is None  # v2 letters must be in order
    assert Scope.parse("patient/Observation.rs") is None

    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [key.public_jwk]}))
    runner = CliRunner()
    result = runner.invoke(fhir_client_command, ["add", "--name", "Hospital A", "--jwks", str(jwks_file),
                                                 "--scope", "system/DiagnosticReport.rs", "--scope", "system/Patient.rs"])
    assert result.exit_code == 0, result.output
    client_id = result.output.strip()
    inline = runner.invoke(fhir_client_command, ["add", "--name", "Hospital B", "--jwks",
                                                 json.dumps({"keys": [ec_key().public_jwk]}), "--scope", "system/*.rs"])
    assert inline.exit_code == 0, inline.output
    bad = runner.invoke(fhir_client_command, ["add", "--name", "C", "--jwks", str(jwks_file), "--scope", "user/*.*"])
    assert bad.exit_code != 0
    with clinic.session() as s:
        row = s.scalar(select(FhirClient).where(FhirClient.client_id == client_id))
        assert row is not None and row.name == "Hospital A"
        assert row.scopes == ["system/DiagnosticReport.rs", "system/Patient.rs"]
        assert "d" not in row.jwks["keys"][0]
