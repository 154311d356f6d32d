// fhir-kit-client, unmodified, against the real `fhirkeep serve`: create, read, update with
// If-Match, search with paging, a transaction Bundle, delete.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { Client } from 'fhir-kit-client';
import { startServer } from './server.mjs';

const PAGE_SIZE = 5;
// More than two pages, not a multiple of the page size: the last page is a short one.
const PAGED_RESOURCES = 12;

let server;
let client;

before(async () => {
  server = await startServer();
  client = new Client({ baseUrl: server.base });
});

after(async () => {
  if (server) await server.stop();
});

// Letters only: a family name the string search matches exactly, unique per test.
function uniqueFamily() {
  return 'Fam' + randomUUID().replace(/-/g, '').replace(/[0-9]/g, (d) => 'ghijklmnop'[d]);
}

function etagOf(result) {
  return Client.httpFor(result).response.headers.get('etag');
}

async function statusOf(promise) {
  try {
    await promise;
    return 'no error';
  } catch (error) {
    return error.response?.status;
  }
}

test('create, read, update with If-Match, delete', async () => {
  const family = uniqueFamily();
  const created = await client.create({
    resourceType: 'Patient',
    body: { resourceType: 'Patient', name: [{ family }], gender: 'female' },
  });
  assert.equal(created.meta.versionId, '1');
  assert.equal(etagOf(created), 'W/"1"');

  const read = await client.read({ resourceType: 'Patient', id: created.id });
  assert.equal(read.name[0].family, family);
  const etag = etagOf(read);
  assert.equal(etag, 'W/"1"');

  const updated = await client.update({
    resourceType: 'Patient',
    id: created.id,
    body: { ...read, gender: 'other' },
    options: { headers: { 'If-Match': etag } },
  });
  assert.equal(updated.meta.versionId, '2');
  assert.equal(etagOf(updated), 'W/"2"');

  // The same If-Match again is stale: 412, and the resource keeps the winner's content.
  const stale = await statusOf(
    client.update({
      resourceType: 'Patient',
      id: created.id,
      body: { ...read, gender: 'male' },
      options: { headers: { 'If-Match': etag } },
    }),
  );
  assert.equal(stale, 412);
  const current = await client.read({ resourceType: 'Patient', id: created.id });
  assert.equal(current.gender, 'other');
  assert.equal(current.meta.versionId, '2');

  await client.delete({ resourceType: 'Patient', id: created.id });
  const gone = await statusOf(client.read({ resourceType: 'Patient', id: created.id }));
  assert.ok(gone === 404 || gone === 410, `read after delete answered ${gone}`);
});

test('search follows next links to the end', async () => {
  const family = uniqueFamily();
  const ids = new Set();
  for (let i = 0; i < PAGED_RESOURCES; i += 1) {
    const created = await client.create({ resourceType: 'Patient', body: { resourceType: 'Patient', name: [{ family }] } });
    ids.add(created.id);
  }
  const found = [];
  let pages = 0;
  let bundle = await client.search({ resourceType: 'Patient', searchParams: { family, _count: PAGE_SIZE } });
  // Bounded: a server that loops its next links fails the test instead of hanging it.
  while (bundle && pages < 2 * PAGED_RESOURCES) {
    pages += 1;
    for (const entry of bundle.entry ?? []) found.push(entry.resource.id);
    bundle = await client.nextPage({ bundle });
  }
  assert.equal(pages, Math.ceil(PAGED_RESOURCES / PAGE_SIZE));
  assert.equal(found.length, PAGED_RESOURCES);
  assert.deepEqual(new Set(found), ids);
});

test('transaction rewrites urn:uuid references', async () => {
  const patientUrn = `urn:uuid:${randomUUID()}`;
  const response = await client.transaction({
    body: {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: patientUrn,
          resource: { resourceType: 'Patient', name: [{ family: uniqueFamily() }] },
          request: { method: 'POST', url: 'Patient' },
        },
        {
          resource: {
            resourceType: 'Observation',
            status: 'final',
            code: { coding: [{ system: 'http://loinc.org', code: '8867-4' }] },
            subject: { reference: patientUrn },
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    },
  });
  assert.equal(response.type, 'transaction-response');
  const refOf = (entry) => entry.response.location.split('/_history/')[0].split('/').slice(-2);
  assert.ok(response.entry.every((entry) => entry.response.status.startsWith('201')));
  const [patientType, patientId] = refOf(response.entry[0]);
  const [observationType, observationId] = refOf(response.entry[1]);
  assert.equal(patientType, 'Patient');
  const observation = await client.read({ resourceType: observationType, id: observationId });
  assert.equal(observation.subject.reference, `Patient/${patientId}`);
  const patient = await client.read({ resourceType: 'Patient', id: patientId });
  assert.equal(patient.id, patientId);
});
