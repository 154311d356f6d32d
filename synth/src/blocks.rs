//! The benchmark data set: a flat stream of resources in fixed-mix blocks, indexed by position.
//!
//! This is the generator the criterion benches and `engine_figures` have always used; its
//! output is pinned byte for byte (see the `golden` test) so that figures in BENCHMARKS.md stay
//! comparable across versions. For patient-centric data with full clinical histories use
//! [`crate::Cohort`].
//!
//! Every resource is a pure function of `(seed, index)`,
//! built from a [`SplitMix64`] stream, so any slice of a data set can be regenerated in any
//! order and two runs with the same seed load byte-identical JSON.
//!
//! # The data set
//!
//! Resources come in blocks of 50 in the proportions of a typical EHR extract: 4 Patients
//! (8 %), 6 Encounters (12 %), 5 Conditions (10 %) and 35 Observations (70 %), shuffled within
//! the block. Observations carry LOINC codes with UCUM `valueQuantity` (or the two components
//! of a blood-pressure panel), reference ranges and interpretations; Conditions carry SNOMED CT
//! codes; Encounters carry SNOMED types and v3 classes. Every clinical resource references a
//! Patient of the data set (mostly one of the block, sometimes an earlier one), Observations
//! and Conditions reference an Encounter of their block. Ids are UUID-shaped (as client systems
//! such as Synthea produce), so inserts land at random places of the B-tree, not at its end.
//! Serialized resources are 0.5–1.5 KB of JSON.

use serde_json::{Map, Value, json};

use crate::resource::{GeneratedResource, ParsedResource};
use crate::rng::{SplitMix64, mix, uuid_id};
use crate::time::{date, date_time};
use crate::vocab::*;
use std::fmt::Write as _;
use std::ops::Range;

/// The four resource types of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `Patient`.
    Patient,
    /// `Encounter`.
    Encounter,
    /// `Condition`.
    Condition,
    /// `Observation`.
    Observation,
}

impl Kind {
    /// The FHIR resource type name.
    pub fn resource_type(self) -> &'static str {
        match self {
            Kind::Patient => "Patient",
            Kind::Encounter => "Encounter",
            Kind::Condition => "Condition",
            Kind::Observation => "Observation",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Patient => "pat",
            Kind::Encounter => "enc",
            Kind::Condition => "con",
            Kind::Observation => "obs",
        }
    }

    fn tag(self) -> u64 {
        match self {
            Kind::Patient => 1,
            Kind::Encounter => 2,
            Kind::Condition => 3,
            Kind::Observation => 4,
        }
    }

    /// How many resources of this kind each block of [`BLOCK`] holds.
    pub fn per_block(self) -> u64 {
        match self {
            Kind::Patient => 4,
            Kind::Encounter => 6,
            Kind::Condition => 5,
            Kind::Observation => 35,
        }
    }
}

/// Resources per block; the mix of [`Kind::per_block`] repeats every block.
pub const BLOCK: u64 = 50;

/// Slot layout inside a block before shuffling: kind and first slot of each kind.
const LAYOUT: [(Kind, u64); 4] = [
    (Kind::Patient, 0),
    (Kind::Encounter, 4),
    (Kind::Condition, 10),
    (Kind::Observation, 15),
];

/// A deterministic, realistic FHIR R4 data set (see the crate docs for its shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dataset {
    seed: u64,
    sequential_ids: bool,
}

/// The seed of [`Dataset::default`].
pub const DEFAULT_SEED: u64 = 0x00F1_4E4B_EE50_0001;

impl Default for Dataset {
    fn default() -> Self {
        Dataset::new(DEFAULT_SEED)
    }
}

impl Dataset {
    /// A data set for `seed`.
    pub fn new(seed: u64) -> Self {
        Dataset {
            seed,
            sequential_ids: false,
        }
    }

    /// The same data set with ids that sort in insertion order (`obs-0000000042`), so inserts
    /// append at the right edge of the B-tree: the best case, for comparison with the default
    /// UUID-shaped ids.
    pub fn with_sequential_ids(mut self) -> Self {
        self.sequential_ids = true;
        self
    }

    /// The kind and per-kind ordinal of resource `index`.
    pub fn slot(&self, index: u64) -> (Kind, u64) {
        let block = index / BLOCK;
        let pos = index % BLOCK;
        let slot = self.block_permutation(block)[usize::try_from(pos).unwrap_or(0)];
        let (kind, first) = LAYOUT
            .iter()
            .rev()
            .find(|(_, first)| slot >= *first)
            .copied()
            .unwrap_or((Kind::Patient, 0));
        (kind, block * kind.per_block() + (slot - first))
    }

    /// Fisher–Yates shuffle of the 50 slots of a block.
    fn block_permutation(&self, block: u64) -> [u64; BLOCK as usize] {
        let mut slots = [0u64; BLOCK as usize];
        for (i, s) in slots.iter_mut().enumerate() {
            *s = i as u64;
        }
        let mut rng = SplitMix64::new(mix(&[self.seed, 0xB10C, block]));
        for i in (1..slots.len()).rev() {
            let j = rng.index(i + 1);
            slots.swap(i, j);
        }
        slots
    }

    /// The id of the `ordinal`-th resource of `kind` (UUID-shaped, deterministic).
    pub fn id_for(&self, kind: Kind, ordinal: u64) -> String {
        if self.sequential_ids {
            return format!("{}-{ordinal:010}", kind.id_prefix());
        }
        uuid_id(&mut SplitMix64::new(mix(&[self.seed, kind.tag(), ordinal])))
    }

    /// Type and id of resource `index`, without generating its body.
    pub fn key(&self, index: u64) -> (&'static str, String) {
        let (kind, ordinal) = self.slot(index);
        (kind.resource_type(), self.id_for(kind, ordinal))
    }

    /// Generates resource `index`.
    pub fn resource(&self, index: u64) -> GeneratedResource {
        let (kind, ordinal) = self.slot(index);
        let id = self.id_for(kind, ordinal);
        let mut rng = SplitMix64::new(mix(&[self.seed, 0xB0D7, index]));
        let block = index / BLOCK;
        let value = match kind {
            Kind::Patient => patient(&mut rng, &id, ordinal),
            Kind::Encounter => encounter(self, &mut rng, &id, block),
            Kind::Condition => condition(self, &mut rng, &id, block),
            Kind::Observation => observation(self, &mut rng, &id, block),
        };
        GeneratedResource {
            resource_type: kind.resource_type(),
            id,
            json: value.to_string(),
        }
    }

    /// Generates resources `range`.
    pub fn batch(&self, range: Range<u64>) -> Vec<GeneratedResource> {
        range.map(|i| self.resource(i)).collect()
    }

    /// Generates resources `range` and parses them, ready for a store write (`update_many`).
    pub fn parsed_batch(&self, range: Range<u64>) -> serde_json::Result<Vec<ParsedResource>> {
        range
            .map(|i| {
                let r = self.resource(i);
                Ok(ParsedResource {
                    body: r.to_value()?,
                    resource_type: r.resource_type,
                    id: r.id,
                })
            })
            .collect()
    }

    /// A patient reference for a resource in `block`: usually one of the block's patients,
    /// sometimes (30 %) any earlier patient.
    fn patient_ref(&self, rng: &mut SplitMix64, block: u64) -> (String, u64) {
        let per = Kind::Patient.per_block();
        let ordinal = if block > 0 && rng.chance(0.3) {
            rng.below(block * per)
        } else {
            block * per + rng.below(per)
        };
        (
            format!("Patient/{}", self.id_for(Kind::Patient, ordinal)),
            ordinal,
        )
    }

    fn encounter_ref(&self, rng: &mut SplitMix64, block: u64) -> String {
        let per = Kind::Encounter.per_block();
        format!(
            "Encounter/{}",
            self.id_for(Kind::Encounter, block * per + rng.below(per))
        )
    }
}

/// The seconds since 1970 of 2014-01-01T00:00:00Z; clinical dates span about ten years from it.
const EPOCH_2014: i64 = 1_388_534_400;
const TEN_YEARS: u64 = 10 * 365 * 86_400;
fn clinical_time(rng: &mut SplitMix64) -> i64 {
    EPOCH_2014 + i64::try_from(rng.below(TEN_YEARS)).unwrap_or(0)
}

pub(crate) fn number(value: f64, decimals: i32) -> Value {
    let scale = 10f64.powi(decimals);
    let rounded = (value * scale).round() / scale;
    if decimals == 0 {
        // Integral vital signs (heart rate, blood pressure) are integers in real feeds.
        json!(rounded as i64)
    } else {
        serde_json::Number::from_f64(rounded).map_or(Value::Null, Value::Number)
    }
}

fn practitioner_ref(rng: &mut SplitMix64) -> (String, String) {
    let n = rng.below(400);
    let names = if rng.chance(0.5) {
        GIVEN_FEMALE
    } else {
        GIVEN_MALE
    };
    let given = *rng.pick(names);
    let family = *rng.pick(FAMILY);
    (
        format!("Practitioner/pr-{n:05}"),
        format!("Dr. {given} {family}"),
    )
}

fn patient(rng: &mut SplitMix64, id: &str, ordinal: u64) -> Value {
    let female = rng.chance(0.51);
    let given = *rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
    let middle = *rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
    let family = *rng.pick(FAMILY);
    // Born 1930–2020.
    let birth = -1_262_304_000 + i64::try_from(rng.below(90 * 365 * 86_400)).unwrap_or(0);
    let (city, state, zip) = *rng.pick(CITIES);
    let (lang, lang_display) = *rng.pick(LANGUAGES);
    let (marital, marital_display) = *rng.pick(MARITAL);
    let (race, race_display) = *rng.pick(RACES);
    let phone = format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000));
    let mut patient = json!({
        "resourceType": "Patient",
        "id": id,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "extension": [{
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race, "display": race_display}},
                {"url": "text", "valueString": race_display}
            ]
        }],
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR", "display": "Medical Record Number"}]},
                "system": "urn:oid:1.2.36.146.595.217.0.1",
                "value": format!("MRN{:08}", ordinal)
            },
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS", "display": "Social Security Number"}]},
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": format!("999-{:02}-{:04}", rng.below(100), rng.below(10_000))
            }
        ],
        "active": true,
        "name": [{
            "use": "official",
            "family": family,
            "given": [given, middle],
            "prefix": [if female { "Ms." } else { "Mr." }]
        }],
        "telecom": [
            {"system": "phone", "value": phone, "use": "home"},
            {"system": "email", "value": format!("{}.{}{}@example.org", given.to_lowercase(), family.to_lowercase(), rng.below(100))}
        ],
        "gender": if female { "female" } else { "male" },
        "birthDate": date(birth),
        "address": [{
            "use": "home",
            "line": [format!("{} {}", 1 + rng.below(9_999), rng.pick(STREETS))],
            "city": city,
            "state": state,
            "postalCode": format!("{zip}{:02}", rng.below(100)),
            "country": "US"
        }],
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": marital, "display": marital_display}], "text": marital_display},
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang, "display": lang_display}], "text": lang_display}}]
    });
    if rng.chance(0.04)
        && let Some(object) = patient.as_object_mut()
    {
        object.insert(
            "deceasedDateTime".into(),
            json!(date_time(clinical_time(rng))),
        );
    }
    patient
}

const ENCOUNTER_TYPES: &[(&str, &str, &str, &str)] = &[
    (
        "185349003",
        "Encounter for check up (procedure)",
        "AMB",
        "ambulatory",
    ),
    (
        "185345009",
        "Encounter for symptom (procedure)",
        "AMB",
        "ambulatory",
    ),
    (
        "390906007",
        "Follow-up encounter (procedure)",
        "AMB",
        "ambulatory",
    ),
    (
        "50849002",
        "Emergency room admission (procedure)",
        "EMER",
        "emergency",
    ),
    (
        "32485007",
        "Hospital admission (procedure)",
        "IMP",
        "inpatient encounter",
    ),
    (
        "162673000",
        "General examination of patient (procedure)",
        "AMB",
        "ambulatory",
    ),
    (
        "698314001",
        "Consultation for treatment (procedure)",
        "AMB",
        "ambulatory",
    ),
];

fn encounter(ds: &Dataset, rng: &mut SplitMix64, id: &str, block: u64) -> Value {
    let (patient, _) = ds.patient_ref(rng, block);
    let (code, display, class, class_display) = *rng.pick(ENCOUNTER_TYPES);
    let (practitioner, practitioner_name) = practitioner_ref(rng);
    let start = clinical_time(rng);
    let minutes = if class == "IMP" {
        60 * 24 * (1 + rng.below(6))
    } else {
        15 + rng.below(75)
    };
    let end = start + i64::try_from(minutes * 60).unwrap_or(0);
    let (reason, reason_display) = *rng.pick(CONDITIONS);
    json!({
        "resourceType": "Encounter",
        "id": id,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter"]},
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.2", "value": format!("V{:010}", rng.below(10_000_000_000))}],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class, "display": class_display},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}], "text": display}],
        "subject": {"reference": patient},
        "participant": [{
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PPRF", "display": "primary performer"}]}],
            "individual": {"reference": practitioner, "display": practitioner_name}
        }],
        "period": {"start": date_time(start), "end": date_time(end)},
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": reason, "display": reason_display}]}],
        "serviceProvider": {"reference": format!("Organization/org-{:03}", rng.below(40))},
        "location": [{"location": {"reference": format!("Location/loc-{:03}", rng.below(120))}}]
    })
}

const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2 (disorder)"),
    (
        "38341003",
        "Hypertensive disorder, systemic arterial (disorder)",
    ),
    ("195967001", "Asthma (disorder)"),
    ("13645005", "Chronic obstructive lung disease (disorder)"),
    ("55822004", "Hyperlipidemia (disorder)"),
    ("35489007", "Depressive disorder (disorder)"),
    ("162864005", "Body mass index 30+ - obesity (finding)"),
    ("49436004", "Atrial fibrillation (disorder)"),
    ("444814009", "Viral sinusitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
    ("233604007", "Pneumonia (disorder)"),
    ("271737000", "Anemia (disorder)"),
    ("709044004", "Chronic kidney disease (disorder)"),
    ("40055000", "Chronic sinusitis (disorder)"),
    ("399211009", "History of myocardial infarction (situation)"),
    ("15777000", "Prediabetes (finding)"),
];

fn condition(ds: &Dataset, rng: &mut SplitMix64, id: &str, block: u64) -> Value {
    let (patient, _) = ds.patient_ref(rng, block);
    let encounter = ds.encounter_ref(rng, block);
    let (code, display) = *rng.pick(CONDITIONS);
    let onset = clinical_time(rng);
    let resolved = rng.chance(0.3);
    let (category, category_display) = if rng.chance(0.6) {
        ("problem-list-item", "Problem List Item")
    } else {
        ("encounter-diagnosis", "Encounter Diagnosis")
    };
    let mut condition = json!({
        "resourceType": "Condition",
        "id": id,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"]},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": if resolved { "resolved" } else { "active" }}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": category, "display": category_display}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}], "text": display},
        "subject": {"reference": patient},
        "encounter": {"reference": encounter},
        "onsetDateTime": date_time(onset),
        "recordedDate": date_time(onset + i64::try_from(rng.below(7 * 86_400)).unwrap_or(0))
    });
    if resolved && let Some(object) = condition.as_object_mut() {
        object.insert(
            "abatementDateTime".into(),
            json!(date_time(
                onset + i64::try_from(86_400 + rng.below(365 * 86_400)).unwrap_or(0)
            )),
        );
    }
    condition
}

/// A LOINC-coded quantitative observation: code, display, category, UCUM unit, mean, sd,
/// decimals, reference range.
#[derive(Debug, Clone, Copy)]
struct Lab {
    loinc: &'static str,
    display: &'static str,
    vital: bool,
    unit: &'static str,
    mean: f64,
    sd: f64,
    decimals: i32,
    low: f64,
    high: f64,
}

const fn lab(
    loinc: &'static str,
    display: &'static str,
    vital: bool,
    unit: &'static str,
    (mean, sd, decimals): (f64, f64, i32),
    (low, high): (f64, f64),
) -> Lab {
    Lab {
        loinc,
        display,
        vital,
        unit,
        mean,
        sd,
        decimals,
        low,
        high,
    }
}

/// Weighted by repetition: vital signs dominate real observation feeds.
const LABS: &[Lab] = &[
    lab(
        "8867-4",
        "Heart rate",
        true,
        "/min",
        (76.0, 12.0, 0),
        (60.0, 100.0),
    ),
    lab(
        "8867-4",
        "Heart rate",
        true,
        "/min",
        (76.0, 12.0, 0),
        (60.0, 100.0),
    ),
    lab(
        "8480-6",
        "Systolic blood pressure",
        true,
        "mm[Hg]",
        (124.0, 16.0, 0),
        (90.0, 140.0),
    ),
    lab(
        "8462-4",
        "Diastolic blood pressure",
        true,
        "mm[Hg]",
        (79.0, 10.0, 0),
        (60.0, 90.0),
    ),
    lab(
        "8310-5",
        "Body temperature",
        true,
        "Cel",
        (36.9, 0.4, 1),
        (36.1, 37.5),
    ),
    lab(
        "9279-1",
        "Respiratory rate",
        true,
        "/min",
        (16.0, 2.5, 0),
        (12.0, 20.0),
    ),
    lab(
        "59408-5",
        "Oxygen saturation in Arterial blood by Pulse oximetry",
        true,
        "%",
        (97.0, 1.5, 0),
        (95.0, 100.0),
    ),
    lab(
        "29463-7",
        "Body weight",
        true,
        "kg",
        (78.0, 17.0, 1),
        (45.0, 120.0),
    ),
    lab(
        "8302-2",
        "Body height",
        true,
        "cm",
        (169.0, 10.0, 1),
        (145.0, 200.0),
    ),
    lab(
        "39156-5",
        "Body mass index (BMI) [Ratio]",
        true,
        "kg/m2",
        (27.3, 5.0, 1),
        (18.5, 25.0),
    ),
    lab(
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        false,
        "mg/dL",
        (102.0, 25.0, 0),
        (70.0, 99.0),
    ),
    lab(
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        false,
        "%",
        (5.9, 0.9, 1),
        (4.0, 5.6),
    ),
    lab(
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        false,
        "mg/dL",
        (195.0, 38.0, 0),
        (125.0, 200.0),
    ),
    lab(
        "2571-8",
        "Triglyceride [Mass/volume] in Serum or Plasma",
        false,
        "mg/dL",
        (140.0, 60.0, 0),
        (0.0, 150.0),
    ),
    lab(
        "2085-9",
        "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
        false,
        "mg/dL",
        (52.0, 14.0, 0),
        (40.0, 60.0),
    ),
    lab(
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        false,
        "g/dL",
        (13.8, 1.6, 1),
        (12.0, 17.5),
    ),
    lab(
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        false,
        "mg/dL",
        (0.98, 0.25, 2),
        (0.6, 1.3),
    ),
    lab(
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        false,
        "mmol/L",
        (4.2, 0.4, 1),
        (3.5, 5.1),
    ),
    lab(
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        false,
        "mmol/L",
        (139.0, 3.0, 0),
        (136.0, 145.0),
    ),
    lab(
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        false,
        "10*3/uL",
        (7.2, 2.0, 1),
        (4.5, 11.0),
    ),
];

fn quantity(value: Value, unit: &str) -> Value {
    json!({"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit})
}

fn interpretation(value: f64, low: f64, high: f64) -> Value {
    let (code, display) = if value < low {
        ("L", "Low")
    } else if value > high {
        ("H", "High")
    } else {
        ("N", "Normal")
    };
    json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": code, "display": display}]}])
}

fn observation(ds: &Dataset, rng: &mut SplitMix64, id: &str, block: u64) -> Value {
    let (patient, _) = ds.patient_ref(rng, block);
    let encounter = ds.encounter_ref(rng, block);
    let (practitioner, practitioner_name) = practitioner_ref(rng);
    let effective = clinical_time(rng);
    let issued = effective + i64::try_from(60 + rng.below(6 * 3600)).unwrap_or(0);
    let status = if rng.chance(0.97) { "final" } else { "amended" };
    // 12 % are blood-pressure panels (two components), the rest single quantities.
    let panel = rng.chance(0.12);
    let lab = *rng.pick(LABS);
    let vital = panel || lab.vital;
    let mut obs = Map::new();
    obs.insert("resourceType".into(), json!("Observation"));
    obs.insert("id".into(), json!(id));
    let profile = if panel {
        "http://hl7.org/fhir/StructureDefinition/bp"
    } else if vital {
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-vital-signs"
    } else {
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"
    };
    obs.insert("meta".into(), json!({"profile": [profile]}));
    obs.insert(
        "identifier".into(),
        json!([{"system": "urn:oid:1.2.36.146.595.217.0.3", "value": format!("OBS{:012}", rng.below(1_000_000_000_000))}]),
    );
    obs.insert("status".into(), json!(status));
    let (category, category_display) = if vital {
        ("vital-signs", "Vital Signs")
    } else {
        ("laboratory", "Laboratory")
    };
    obs.insert(
        "category".into(),
        json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category, "display": category_display}]}]),
    );
    if panel {
        let systolic = rng.normal(124.0, 16.0);
        let diastolic = rng.normal(79.0, 10.0);
        obs.insert(
            "code".into(),
            json!({"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure"}),
        );
        insert_context(&mut obs, &patient, &encounter, effective, issued);
        obs.insert(
            "performer".into(),
            json!([{"reference": practitioner, "display": practitioner_name}]),
        );
        obs.insert(
            "component".into(),
            json!([
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
                    "valueQuantity": quantity(number(systolic, 0), "mm[Hg]"),
                    "interpretation": interpretation(systolic, 90.0, 140.0)
                },
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
                    "valueQuantity": quantity(number(diastolic, 0), "mm[Hg]"),
                    "interpretation": interpretation(diastolic, 60.0, 90.0)
                }
            ]),
        );
    } else {
        let value = rng.normal(lab.mean, lab.sd).max(0.0);
        obs.insert(
            "code".into(),
            json!({"coding": [{"system": "http://loinc.org", "code": lab.loinc, "display": lab.display}], "text": lab.display}),
        );
        insert_context(&mut obs, &patient, &encounter, effective, issued);
        obs.insert(
            "performer".into(),
            json!([{"reference": practitioner, "display": practitioner_name}]),
        );
        obs.insert(
            "valueQuantity".into(),
            quantity(number(value, lab.decimals), lab.unit),
        );
        obs.insert(
            "interpretation".into(),
            interpretation(value, lab.low, lab.high),
        );
        // Labs carry the reporting lab's reference range; vital signs usually do not.
        if !lab.vital {
            obs.insert(
                "referenceRange".into(),
                json!([{
                    "low": quantity(number(lab.low, lab.decimals), lab.unit),
                    "high": quantity(number(lab.high, lab.decimals), lab.unit)
                }]),
            );
        }
    }
    if rng.chance(0.1) {
        obs.insert("note".into(), json!([{"text": *rng.pick(NOTES)}]));
    }
    Value::Object(obs)
}

const NOTES: &[&str] = &[
    "Patient seated, rested 5 minutes before measurement.",
    "Repeat measurement requested at next visit.",
    "Specimen slightly hemolyzed; interpret with caution.",
    "Fasting sample.",
    "Measured after exercise.",
];

fn insert_context(
    obs: &mut Map<String, Value>,
    patient: &str,
    encounter: &str,
    effective: i64,
    issued: i64,
) {
    obs.insert("subject".into(), json!({"reference": patient}));
    obs.insert("encounter".into(), json!({"reference": encounter}));
    obs.insert("effectiveDateTime".into(), json!(date_time(effective)));
    let mut instant = date(issued);
    let tod = issued.rem_euclid(86_400);
    // An instant, in UTC with milliseconds, as servers stamp `issued`.
    let _ = write!(
        instant,
        "T{:02}:{:02}:{:02}.{:03}Z",
        tod / 3600,
        (tod / 60) % 60,
        tod % 60,
        issued.rem_euclid(1000)
    );
    obs.insert("issued".into(), json!(instant));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn fnv(hash: &mut u64, bytes: &[u8]) {
        for b in bytes {
            *hash ^= u64::from(*b);
            *hash = hash.wrapping_mul(0x100_0000_01b3);
        }
    }

    /// The data set is pinned: these hashes were taken from the generator as it lived in
    /// `fhirkeep-benches` when BENCHMARKS.md was measured. A change here changes the figures.
    #[test]
    fn golden() {
        let cases = [
            (Dataset::default(), 0x8e8d_38d5_6456_07f2u64),
            (Dataset::new(7), 0xa14f_69ea_9303_3af1),
            (Dataset::new(7).with_sequential_ids(), 0xbf63_a514_abe9_7998),
        ];
        for (dataset, expected) in cases {
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            for i in 0..3000 {
                let r = dataset.resource(i);
                fnv(&mut hash, r.resource_type.as_bytes());
                fnv(&mut hash, r.id.as_bytes());
                fnv(&mut hash, r.json.as_bytes());
            }
            assert_eq!(hash, expected, "{dataset:?}");
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let a = Dataset::new(7);
        let b = Dataset::new(7);
        for i in [0, 1, 49, 50, 12_345] {
            assert_eq!(a.resource(i), b.resource(i));
        }
        assert_ne!(Dataset::new(8).resource(3), a.resource(3));
        let seq = Dataset::new(7).with_sequential_ids();
        assert_eq!(seq.key(0).1.len(), "obs-0000000000".len());
        assert!(fhirkeep_engine::resource::is_valid_id(&seq.key(0).1));
    }

    #[test]
    fn mix_sizes_and_ids_are_realistic() {
        let ds = Dataset::default();
        let n = 5_000;
        let mut kinds: HashMap<&str, u64> = HashMap::new();
        let mut ids = HashSet::new();
        let mut total = 0usize;
        for i in 0..n {
            let r = ds.resource(i);
            let v = r.to_value().unwrap();
            assert_eq!(v["resourceType"], r.resource_type);
            assert_eq!(v["id"], r.id.as_str());
            assert!(fhirkeep_engine::resource::is_valid_id(&r.id));
            assert_eq!(ds.key(i), (r.resource_type, r.id.clone()));
            assert!(
                (400..=1_700).contains(&r.json.len()),
                "{} is {} bytes",
                r.reference(),
                r.json.len()
            );
            total += r.json.len();
            *kinds.entry(r.resource_type).or_default() += 1;
            assert!(ids.insert(r.reference()));
        }
        assert_eq!(kinds["Observation"], n * 35 / 50);
        assert_eq!(kinds["Patient"], n * 4 / 50);
        let mean = total / n as usize;
        assert!((600..=1_300).contains(&mean), "mean size {mean}");
    }

    #[test]
    fn references_point_to_generated_patients() {
        let ds = Dataset::default();
        let patients: HashSet<String> = (0..1_000)
            .filter(|&i| ds.slot(i).0 == Kind::Patient)
            .map(|i| ds.resource(i).reference())
            .collect();
        for i in 0..1_000 {
            let v = ds.resource(i).to_value().unwrap();
            if let Some(subject) = v["subject"]["reference"].as_str() {
                assert!(patients.contains(subject), "{subject}");
            }
        }
    }
}
