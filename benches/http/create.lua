-- wrk script: POST /Patient with a small Patient (benches/http/run.sh, "single creates").
-- Each request creates a new resource with a server-assigned id; concurrent requests share
-- store commits (group commit).
wrk.method = "POST"
wrk.path = "/Patient"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Prefer"] = "return=minimal"
wrk.body = '{"resourceType":"Patient","active":true,"gender":"female","birthDate":"1970-01-01","name":[{"family":"Load","given":["Bench"]}]}'
