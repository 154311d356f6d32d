"""Real Python FHIR clients, unmodified, against the real `fhirkeep serve`.

Each client creates, reads, updates (version-aware), searches with paging, posts a
transaction Bundle and deletes, through its own public API. Where a client cannot send
`If-Match`, its native update is used and the server's ETag semantics are checked with a raw
request in the same test.
"""

import uuid

import pytest
import requests
from fhirclient import client as fc_client
from fhirclient import server as fc_server
from fhirclient.models.bundle import Bundle as FcBundle
from fhirclient.models.patient import Patient as FcPatient
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, ResourceNotFound

PAGE_SIZE = 5
# More than two pages, and not a multiple of the page size: the last page is a short one.
PAGED_RESOURCES = 12
TIMEOUT_S = 30


def unique_family() -> str:
    # Letters only: a family name the string search matches exactly, unique per test.
    return "Fam" + uuid.uuid4().hex.translate(str.maketrans("0123456789", "ghijklmnop"))


def raw_get(server, path: str) -> requests.Response:
    return requests.get(f"{server.base}/{path}", headers={"Accept": "application/fhir+json"}, timeout=TIMEOUT_S)


def raw_put(server, path: str, body: dict, if_match: str | None) -> requests.Response:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if if_match is not None:
        headers["If-Match"] = if_match
    return requests.put(f"{server.base}/{path}", json=body, headers=headers, timeout=TIMEOUT_S)


def transaction_bundle(family: str) -> dict:
    """A Patient and an Observation whose subject is the Patient's temporary urn:uuid."""
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient", "name": [{"family": family}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": patient_urn},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }


def check_transaction_response(server, response: dict) -> None:
    """Both entries were created and the Observation's subject now names the new Patient."""
    assert response["resourceType"] == "Bundle"
    assert response["type"] == "transaction-response"
    statuses = [entry["response"]["status"] for entry in response["entry"]]
    assert all(status.startswith("201") for status in statuses), statuses
    patient_location = response["entry"][0]["response"]["location"]
    observation_location = response["entry"][1]["response"]["location"]
    # Locations are TYPE/ID/_history/VID, relative or absolute.
    patient_ref = "/".join(patient_location.split("/_history/")[0].split("/")[-2:])
    observation_ref = "/".join(observation_location.split("/_history/")[0].split("/")[-2:])
    assert patient_ref.startswith("Patient/")
    observation = raw_get(server, observation_ref).json()
    assert observation["subject"]["reference"] == patient_ref
    assert raw_get(server, patient_ref).status_code == 200


# -- smart-on-fhir's client-py (`fhirclient`) ------------------------------------------------


@pytest.fixture
def smart(server):
    return fc_client.FHIRClient(settings={"app_id": "fhirkeep-tests", "api_base": server.base + "/"})


def test_fhirclient_create_read_update_delete(server, smart):
    family = unique_family()
    created = FcPatient({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
    body = created.create(smart.server)
    assert body is not None and body["meta"]["versionId"] == "1"
    patient_id = body["id"]

    patient = FcPatient.read(patient_id, smart.server)
    assert patient.name[0].family == family
    assert patient.meta.versionId == "1"

    # fhirclient's update is a plain PUT without If-Match: use it, then check the server's
    # version-aware semantics with raw requests on the same resource.
    patient.gender = "other"
    updated = patient.update()
    assert updated["meta"]["versionId"] == "2"
    assert FcPatient.read(patient_id, smart.server).gender == "other"

    stale = raw_put(server, f"Patient/{patient_id}", dict(updated, gender="male"), 'W/"1"')
    assert stale.status_code == 412, stale.text
    assert stale.json()["resourceType"] == "OperationOutcome"
    current = raw_get(server, f"Patient/{patient_id}")
    assert current.headers["ETag"] == 'W/"2"'
    fresh = raw_put(server, f"Patient/{patient_id}", dict(updated, gender="male"), current.headers["ETag"])
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["ETag"] == 'W/"3"'
    assert FcPatient.read(patient_id, smart.server).gender == "male"

    again = FcPatient.read(patient_id, smart.server)
    again.delete()
    with pytest.raises((fc_server.FHIRNotFoundException, requests.HTTPError)) as gone:
        FcPatient.read(patient_id, smart.server)
    assert gone.value.response.status_code in (404, 410)


def test_fhirclient_search_follows_next_links(server, smart):
    family = unique_family()
    ids = set()
    for _ in range(PAGED_RESOURCES):
        ids.add(FcPatient({"resourceType": "Patient", "name": [{"family": family}]}).create(smart.server)["id"])
    search = FcPatient.where({"family": family, "_count": str(PAGE_SIZE)})
    pages = list(search.perform_iter(smart.server))
    assert len(pages) == -(-PAGED_RESOURCES // PAGE_SIZE)
    found = [entry.resource.id for page in pages for entry in page.entry or []]
    assert len(found) == PAGED_RESOURCES
    assert set(found) == ids


def test_fhirclient_transaction_rewrites_urn_uuid_references(server, smart):
    bundle = FcBundle(transaction_bundle(unique_family()))
    response = bundle.create(smart.server)
    check_transaction_response(server, response)


# -- fhirpy (sync API) -------------------------------------------------------------------------


@pytest.fixture
def fhirpy_client(server):
    return SyncFHIRClient(server.base, requests_config={"timeout": TIMEOUT_S})


def test_fhirpy_create_read_update_delete(server, fhirpy_client):
    family = unique_family()
    patient = fhirpy_client.resource("Patient", name=[{"family": family}], gender="female")
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"

    read = fhirpy_client.reference("Patient", patient.id).to_resource()
    assert read["name"][0]["family"] == family

    # Version-aware update: fhirpy's public `extra_headers` sends If-Match on every request
    # of a client made for it.
    with_v1 = SyncFHIRClient(server.base, extra_headers={"If-Match": 'W/"1"'}, requests_config={"timeout": TIMEOUT_S})
    first = with_v1.resource("Patient", **{**read, "gender": "other"})
    first.save()
    assert first["meta"]["versionId"] == "2"
    # The same If-Match again is stale now: 412, which fhirpy reports as its own exception.
    stale = with_v1.resource("Patient", **{**read, "gender": "male"})
    with pytest.raises(MultipleResourcesFound):
        stale.save()
    assert fhirpy_client.reference("Patient", patient.id).to_resource()["gender"] == "other"

    # fhirpy's plain update (no If-Match) is last-writer-wins.
    latest = fhirpy_client.reference("Patient", patient.id).to_resource()
    latest["gender"] = "unknown"
    latest.save()
    assert latest["meta"]["versionId"] == "3"
    assert raw_get(server, f"Patient/{patient.id}").headers["ETag"] == 'W/"3"'

    latest.delete()
    with pytest.raises(ResourceNotFound):
        fhirpy_client.reference("Patient", patient.id).to_resource()


def test_fhirpy_search_follows_next_links(server, fhirpy_client):
    family = unique_family()
    ids = set()
    for _ in range(PAGED_RESOURCES):
        created = fhirpy_client.resource("Patient", name=[{"family": family}])
        created.save()
        ids.add(created.id)
    search = fhirpy_client.resources("Patient").search(family=family).limit(PAGE_SIZE)
    first_page = search.fetch()
    assert len(first_page) == PAGE_SIZE
    found = [resource.id for resource in search]  # iterating follows `next` links
    assert len(found) == PAGED_RESOURCES
    assert set(found) == ids


def test_fhirpy_transaction_rewrites_urn_uuid_references(server, fhirpy_client):
    response = fhirpy_client.execute("", method="post", data=transaction_bundle(unique_family()))
    check_transaction_response(server, response)
