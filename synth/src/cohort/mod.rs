//! Patient-centric synthetic data: each patient of a [`Cohort`] is a [`PatientRecord`], the
//! Patient and several years of clinical history, generated as a pure function of
//! `(seed, patient index)`.
//!
//! A record is built in two steps. First a *person* is drawn (sex, birth, baselines such as
//! adult height, BMI and blood pressure, smoking, chronic conditions with their onsets), then
//! a timeline of visits between the start of the record and the cohort's epoch (or death):
//! well-child and yearly check-ups, acute problems, visits that diagnose and follow up the
//! chronic conditions, emergencies and admissions. Walking the timeline emits the resources
//! of each visit, so results follow the person: a diabetic's HbA1c is high, a hypertensive's
//! blood pressure too, children grow, cholesterol falls once a statin is prescribed.
//!
//! Practitioners and organizations are referenced logically (by NPI identifier), never
//! literally, so every literal reference in a record resolves to a resource of that record.

mod codes;
mod fhir;

use std::ops::Range;

use serde_json::{Map, Value, json};

use self::codes::*;
use self::fhir::{
    coded, concept, interpretation, logical, quantity, reference, reference_range, rounded,
};
use crate::blocks::number;
use crate::resource::GeneratedResource;
use crate::rng::{SplitMix64, mix, time_ordered_uuid_id, uuid_id};
use crate::time::{
    DAY, YEAR, instant, local_date, local_date_time, local_midnight, local_month, local_year,
    local_ymd,
};
use crate::vocab::{CITIES, FAMILY, GIVEN_FEMALE, GIVEN_MALE, LANGUAGES, MARITAL, RACES, STREETS};

/// The resource types a [`Cohort`] generates, in the order [`crate::NdjsonExport`] reports
/// them.
pub const RESOURCE_TYPES: [&str; 8] = [
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "Procedure",
    "Immunization",
];

const PATIENT: usize = 0;
const ENCOUNTER: usize = 1;
const CONDITION: usize = 2;
const OBSERVATION: usize = 3;
const DIAGNOSTIC_REPORT: usize = 4;
const MEDICATION_REQUEST: usize = 5;
const PROCEDURE: usize = 6;
const IMMUNIZATION: usize = 7;

/// Domain tags keep the random streams of different purposes apart.
const TAG_EPOCH: u64 = 0xE9_0C;
const TAG_ID: u64 = 0x1D;
const TAG_PATIENT: u64 = 0x9A71;
const TAG_PRACTITIONER: u64 = 0x9C;

/// 2025-01-01T00:00:00Z: epochs of seeds fall in the year before it.
const LATEST_EPOCH: i64 = 1_735_689_600;

/// Size of the shared pool of clinicians patients see.
const PRACTITIONERS: u64 = 5_000;

const US_CORE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/";

/// A deterministic population of synthetic patients.
///
/// Patient `i` depends only on the seed, the epoch and `i`: records can be generated in any
/// order, in parallel, or as a slice of a larger cohort, and always come out identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cohort {
    seed: u64,
    epoch: i64,
    time_ordered_ids: bool,
}

impl Default for Cohort {
    fn default() -> Self {
        Cohort::new(crate::DEFAULT_SEED)
    }
}

impl Cohort {
    /// The cohort of `seed`. Its epoch (the "today" all histories end at) is a midnight UTC
    /// in 2024, derived from the seed, so output never depends on the wall clock.
    pub fn new(seed: u64) -> Self {
        let days_back = i64::try_from(mix(&[seed, TAG_EPOCH]) % 365).unwrap_or(0);
        Cohort {
            seed,
            epoch: LATEST_EPOCH - (1 + days_back) * DAY,
            time_ordered_ids: false,
        }
    }

    /// The same cohort with UUIDv7-shaped ids that rise in generation order within each
    /// resource type, as a server that assigns UUIDv7 ids (fhirkeep does) would have given
    /// them: patient `i`'s resources carry the timestamp `epoch + i` ms. The default is
    /// random version-4 UUIDs, as data exported from another system usually has.
    pub fn with_time_ordered_ids(mut self) -> Self {
        self.time_ordered_ids = true;
        self
    }

    /// The same cohort with histories ending at `epoch` (seconds since 1970, UTC) instead.
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The epoch in seconds since 1970 (UTC): every generated date lies before it.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The epoch as a FHIR date (`YYYY-MM-DD`, UTC).
    pub fn epoch_date(&self) -> String {
        crate::time::date(self.epoch)
    }

    /// The id of patient `index` (UUID-shaped), without generating the record.
    pub fn patient_id(&self, index: u64) -> String {
        self.resource_id(index, PATIENT, 0)
    }

    fn resource_id(&self, index: u64, kind: usize, ordinal: u64) -> String {
        let mut rng = SplitMix64::new(mix(&[self.seed, TAG_ID, index, kind as u64, ordinal]));
        if self.time_ordered_ids {
            let millis = u64::try_from(self.epoch).unwrap_or(0) * 1000 + index;
            time_ordered_uuid_id(millis, ordinal, &mut rng)
        } else {
            uuid_id(&mut rng)
        }
    }

    /// Generates patient `index`: the Patient first, then the clinical resources in the order
    /// of the visits they belong to.
    pub fn patient(&self, index: u64) -> PatientRecord {
        Builder::new(self, index).build()
    }

    /// Generates the patients of `range`, one record at a time.
    pub fn patients(&self, range: Range<u64>) -> impl Iterator<Item = PatientRecord> + '_ {
        range.map(|index| self.patient(index))
    }
}

/// One patient and everything that refers to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRecord {
    index: u64,
    resources: Vec<GeneratedResource>,
}

impl PatientRecord {
    /// The patient's index in the cohort.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The Patient resource.
    pub fn patient(&self) -> &GeneratedResource {
        // The builder pushes the Patient before anything else.
        &self.resources[0]
    }

    /// Every resource of the record, the Patient first.
    pub fn resources(&self) -> &[GeneratedResource] {
        &self.resources
    }

    /// The resources, by value.
    pub fn into_resources(self) -> Vec<GeneratedResource> {
        self.resources
    }

    /// How many resources of `resource_type` the record holds.
    pub fn count(&self, resource_type: &str) -> usize {
        self.resources
            .iter()
            .filter(|r| r.resource_type == resource_type)
            .count()
    }
}

/// Normal-ish draw clamped to `[lo, hi]`.
fn clamp_normal(rng: &mut SplitMix64, mean: f64, sd: f64, lo: f64, hi: f64) -> f64 {
    rng.normal(mean, sd).clamp(lo, hi)
}

/// Poisson-distributed count (Knuth; fine for the small means used here).
fn poisson(rng: &mut SplitMix64, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 40.0 {
        return rng.normal(mean, mean.sqrt()).max(0.0).round() as u64;
    }
    let limit = (-mean).exp();
    let mut product = rng.unit();
    let mut count = 0;
    while product > limit && count < 1_000 {
        product *= rng.unit();
        count += 1;
    }
    count
}

fn secs(value: f64) -> i64 {
    value as i64
}

fn random_secs(rng: &mut SplitMix64, span: i64) -> i64 {
    i64::try_from(rng.below(u64::try_from(span.max(1)).unwrap_or(1))).unwrap_or(0)
}

/// A time during clinic hours (08:00–16:45 local, on the quarter hour) on the weekday at or
/// after the day of `t`.
fn clinic_time(rng: &mut SplitMix64, t: i64) -> i64 {
    let midnight = local_midnight(t);
    // 1970-01-01 was a Thursday: weekday 0 is Sunday.
    let weekday = (midnight.div_euclid(DAY) + 4).rem_euclid(7);
    let shift = match weekday {
        6 => 2,
        0 => 1,
        _ => 0,
    };
    midnight + shift * DAY + 8 * 3600 + random_secs(rng, 36) * 900
}

/// A clinician of the shared pool: NPI and display name.
fn practitioner(seed: u64, n: u64) -> (String, String) {
    let mut rng = SplitMix64::new(mix(&[seed, TAG_PRACTITIONER, n]));
    let names = if rng.chance(0.5) {
        GIVEN_FEMALE
    } else {
        GIVEN_MALE
    };
    let given = *rng.pick(names);
    let family = *rng.pick(FAMILY);
    (
        format!("1{:09}", 100_000_000 + n * 7_919 % 899_999_999),
        format!("Dr. {given} {family}"),
    )
}

const CLINIC_KINDS: [&str; 4] = [
    "Family Medicine",
    "Primary Care Associates",
    "Community Health Center",
    "Internal Medicine Group",
];

/// A clinic (`hospital == false`) or hospital of a city: NPI and name.
fn organization(city: usize, n: usize, hospital: bool) -> (String, String) {
    let (name, _, _) = CITIES[city % CITIES.len()];
    if hospital {
        (
            format!("19{:08}", 40_000_000 + city),
            format!("{name} General Hospital"),
        )
    } else {
        (
            format!("18{:08}", 30_000_000 + city * 10 + n),
            format!("{name} {}", CLINIC_KINDS[n % CLINIC_KINDS.len()]),
        )
    }
}

/// The person behind a record: fixed traits and baselines that results are drawn around.
#[derive(Debug)]
struct Person {
    female: bool,
    birth: i64,
    death: Option<i64>,
    /// Height in cm reached as an adult.
    adult_height: f64,
    /// Adult BMI at age 45 (it drifts with age).
    bmi: f64,
    systolic: f64,
    diastolic: f64,
    heart_rate: f64,
    smoking: usize,
    city: usize,
    clinic: usize,
    pcp: (String, String),
    chronic: Vec<ChronicState>,
}

#[derive(Debug)]
struct ChronicState {
    def: &'static ChronicDef,
    onset: i64,
    drugs: Vec<Drug>,
    /// The Condition's id once it has been recorded at a visit.
    condition: Option<String>,
}

impl Person {
    fn age(&self, t: i64) -> f64 {
        (t - self.birth) as f64 / YEAR as f64
    }

    /// The chronic condition of `kind`, if the person has it by `t`.
    fn has(&self, kind: Chronic, t: i64) -> bool {
        self.chronic
            .iter()
            .any(|c| c.def.kind == kind && c.onset <= t)
    }

    /// Whether the condition has been recorded, i.e. is known and treated, by now.
    fn treated(&self, kind: Chronic) -> bool {
        self.chronic
            .iter()
            .any(|c| c.def.kind == kind && c.condition.is_some())
    }

    fn height(&self, age: f64) -> f64 {
        let scale = self.adult_height / if self.female { 163.0 } else { 176.0 };
        if age < 1.0 {
            (50.0 + 25.0 * age) * scale
        } else if age < 2.0 {
            (75.0 + 12.0 * (age - 1.0)) * scale
        } else if age < 18.0 {
            let at_two = 87.0 * scale;
            at_two + (self.adult_height - at_two) * (age - 2.0) / 16.0
        } else if age > 60.0 {
            self.adult_height - 0.1 * (age - 60.0)
        } else {
            self.adult_height
        }
    }

    fn weight(&self, age: f64, height: f64) -> f64 {
        if age < 1.0 {
            return 3.4 + 6.2 * age;
        }
        if age < 2.0 {
            return 9.6 + 2.5 * (age - 1.0);
        }
        let bmi = if age < 18.0 {
            15.8 + 0.25 * (age - 2.0) + 0.3 * (self.bmi - 27.0)
        } else {
            self.bmi + 0.06 * (age - 45.0).clamp(-27.0, 30.0)
        };
        bmi * (height / 100.0).powi(2)
    }
}

/// What a visit is for.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// A check-up; for children, the age in months of the well-child visit.
    Wellness {
        months: Option<u32>,
    },
    Acute(&'static AcuteDef),
    /// First visit for chronic condition `i`.
    Diagnosis(usize),
    FollowUp(usize),
    /// An admission, for an acute problem or an exacerbation of chronic condition `i`.
    Admission(Option<&'static AcuteDef>, Option<usize>),
}

#[derive(Debug, Clone, Copy)]
struct Visit {
    start: i64,
    purpose: Purpose,
}

/// The encounter being filled with resources.
#[derive(Debug)]
struct Enc {
    id: String,
    start: i64,
    end: i64,
    performer: Value,
}

/// A resource waiting to be serialized once the whole record is known.
#[derive(Debug)]
struct Pending {
    kind: usize,
    id: String,
    body: Map<String, Value>,
}

/// An ongoing prescription of a chronic drug: where its latest order is in `out`.
#[derive(Debug)]
struct Order {
    rxnorm: &'static str,
    latest: usize,
}

struct Builder<'a> {
    cohort: &'a Cohort,
    index: u64,
    rng: SplitMix64,
    patient_id: String,
    counters: [u64; 8],
    birth: i64,
    out: Vec<Pending>,
    orders: Vec<Order>,
    /// Flu seasons (year of the autumn) already vaccinated.
    flu_seasons: Vec<i64>,
    last_tetanus: i64,
    pneumococcal: u8,
    zoster: u8,
    covid: u8,
    colonoscopy: bool,
}

impl<'a> Builder<'a> {
    fn new(cohort: &'a Cohort, index: u64) -> Self {
        Builder {
            cohort,
            index,
            rng: SplitMix64::new(mix(&[cohort.seed, TAG_PATIENT, index])),
            patient_id: cohort.patient_id(index),
            counters: [0; 8],
            birth: i64::MIN,
            out: Vec::new(),
            orders: Vec::new(),
            flu_seasons: Vec::new(),
            last_tetanus: i64::MIN,
            pneumococcal: 0,
            zoster: 0,
            covid: 0,
            colonoscopy: false,
        }
    }

    fn next_id(&mut self, kind: usize) -> String {
        let ordinal = self.counters[kind];
        self.counters[kind] += 1;
        self.cohort.resource_id(self.index, kind, ordinal)
    }

    /// When a result taken at `t` is reported, `delay` later but never after the epoch.
    fn reported(&self, t: i64, delay: i64) -> i64 {
        (t + delay).min(self.cohort.epoch - 1).max(t)
    }

    fn subject(&self) -> Value {
        reference("Patient", &self.patient_id)
    }

    fn push(&mut self, kind: usize, id: String, body: Value) -> usize {
        let body = match body {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self.out.push(Pending { kind, id, body });
        self.out.len() - 1
    }

    fn build(mut self) -> PatientRecord {
        let mut person = self.person();
        self.birth = person.birth;
        let patient = self.patient_resource(&person);
        let id = self.patient_id.clone();
        self.push(PATIENT, id, patient);
        let visits = self.plan(&person);
        for visit in visits {
            self.visit(&mut person, visit);
        }
        self.finish(&person)
    }

    fn person(&mut self) -> Person {
        let epoch = self.cohort.epoch;
        let rng = &mut self.rng;
        let female = rng.chance(0.51);
        // Ages 0–95 at the epoch, thinning out after 75.
        let mut age_years = rng.unit() * 95.0;
        if age_years > 75.0 && rng.chance(0.5) {
            age_years = rng.unit() * 75.0;
        }
        let birth = epoch - secs(age_years * YEAR as f64) - DAY;
        let death = if age_years > 60.0 && rng.chance((age_years - 60.0) / 35.0 * 0.2) {
            Some(
                epoch
                    - DAY
                    - random_secs(rng, 5 * YEAR).min(secs((age_years - 60.0) * YEAR as f64)),
            )
        } else {
            None
        };
        let adult_height = if female {
            clamp_normal(rng, 163.0, 6.5, 145.0, 185.0)
        } else {
            clamp_normal(rng, 176.0, 7.0, 155.0, 200.0)
        };
        let bmi = clamp_normal(rng, 27.5, 5.0, 17.5, 48.0);
        let smoking = if rng.chance(0.55) {
            0
        } else if rng.chance(0.6) {
            1
        } else {
            2
        };
        let city = rng.index(CITIES.len());
        let clinic = rng.index(CLINIC_KINDS.len());
        let pcp = practitioner(self.cohort.seed, rng.below(PRACTITIONERS));
        let mut person = Person {
            female,
            birth,
            death,
            adult_height,
            bmi,
            systolic: clamp_normal(rng, 117.0, 9.0, 95.0, 145.0),
            diastolic: clamp_normal(rng, 75.0, 6.0, 58.0, 92.0),
            heart_rate: clamp_normal(rng, 72.0, 8.0, 50.0, 100.0),
            smoking,
            city,
            clinic,
            pcp,
            chronic: Vec::new(),
        };
        let end = death.unwrap_or(epoch);
        let age_end = person.age(end);
        for def in CHRONIC {
            let has = |kind| {
                person
                    .chronic
                    .iter()
                    .any(|c: &ChronicState| c.def.kind == kind)
            };
            let a = age_end;
            let p = match def.kind {
                Chronic::Hypertension => {
                    ((a - 25.0) * 0.012).clamp(0.0, 0.6) + if bmi >= 30.0 { 0.1 } else { 0.0 }
                }
                Chronic::Diabetes => {
                    ((a - 30.0) * 0.005).clamp(0.0, 0.22) + if bmi >= 30.0 { 0.08 } else { 0.0 }
                }
                Chronic::Prediabetes if has(Chronic::Diabetes) => 0.0,
                Chronic::Prediabetes => 0.12,
                Chronic::Hyperlipidemia => ((a - 30.0) * 0.009).clamp(0.0, 0.45),
                Chronic::Asthma => 0.08,
                Chronic::Copd => match smoking {
                    0 => 0.02,
                    _ => 0.15,
                },
                Chronic::KidneyDisease => {
                    ((a - 50.0) * 0.005).clamp(0.0, 0.2)
                        + if has(Chronic::Diabetes) { 0.08 } else { 0.0 }
                }
                Chronic::Depression => 0.09,
                Chronic::AtrialFibrillation => ((a - 55.0) * 0.004).clamp(0.0, 0.12),
                Chronic::Osteoarthritis => ((a - 45.0) * 0.008).clamp(0.0, 0.35),
                Chronic::Obesity => {
                    if bmi >= 30.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
            };
            if a < def.min_age || !rng.chance(p) {
                continue;
            }
            let earliest = (birth + secs(def.min_age * YEAR as f64)).max(end - 25 * YEAR);
            let latest = end - 30 * DAY;
            if earliest >= latest {
                continue;
            }
            let onset = earliest + random_secs(rng, latest - earliest);
            let mut drugs = Vec::new();
            if !def.first_line.is_empty() {
                drugs.push(*rng.pick(def.first_line));
            }
            drugs.extend_from_slice(def.always);
            person.chronic.push(ChronicState {
                def,
                onset,
                drugs,
                condition: None,
            });
        }
        person
    }

    fn patient_resource(&mut self, person: &Person) -> Value {
        let epoch = self.cohort.epoch;
        let rng = &mut self.rng;
        let names = if person.female {
            GIVEN_FEMALE
        } else {
            GIVEN_MALE
        };
        let given = *rng.pick(names);
        let middle = *rng.pick(names);
        let family = *rng.pick(FAMILY);
        let adult = person.age(epoch) >= 18.0;
        let (city, state, zip) = CITIES[person.city];
        let (lang, lang_display) = *rng.pick(LANGUAGES);
        let (race, race_display) = *rng.pick(RACES);
        let hispanic = rng.chance(0.12);
        let (ethnicity, ethnicity_display) = if hispanic {
            ("2135-2", "Hispanic or Latino")
        } else {
            ("2186-5", "Not Hispanic or Latino")
        };
        let mut name = json!({"use": "official", "family": family, "given": [given, middle]});
        let (marital, marital_display) = if adult {
            *rng.pick(MARITAL)
        } else {
            ("S", "Never Married")
        };
        if adult {
            let prefix = match (person.female, marital) {
                (false, _) => "Mr.",
                (true, "M") => "Mrs.",
                (true, _) => "Ms.",
            };
            name["prefix"] = json!([prefix]);
        }
        let mut names_json = vec![name];
        if person.female && marital == "M" && rng.chance(0.6) {
            names_json
                .push(json!({"use": "maiden", "family": *rng.pick(FAMILY), "given": [given]}));
        }
        let mut identifiers = vec![
            json!({
                "use": "usual",
                "type": coded("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"),
                "system": "urn:oid:1.2.36.146.595.217.0.1",
                "value": format!("MRN{:010}", self.index)
            }),
            json!({
                "type": coded("http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"),
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": format!("999-{:02}-{:04}", rng.below(100), rng.below(10_000))
            }),
        ];
        if person.age(epoch) >= 16.0 && rng.chance(0.8) {
            identifiers.push(json!({
                "type": coded("http://terminology.hl7.org/CodeSystem/v2-0203", "DL", "Driver's License"),
                "system": "urn:oid:2.16.840.1.113883.4.3.25",
                "value": format!("S{:08}", rng.below(100_000_000))
            }));
        }
        let mut telecom = vec![json!({
            "system": "phone",
            "value": format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000)),
            "use": "home"
        })];
        if adult {
            if rng.chance(0.7) {
                telecom.push(json!({
                    "system": "phone",
                    "value": format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000)),
                    "use": "mobile"
                }));
            }
            telecom.push(json!({
                "system": "email",
                "value": format!("{}.{}{}@example.org", given.to_lowercase(), family.to_lowercase().replace('\'', ""), rng.below(100))
            }));
        }
        let (clinic_npi, clinic_name) = organization(person.city, person.clinic, false);
        let mut patient = json!({
            "resourceType": "Patient",
            "id": self.patient_id,
            "meta": {"profile": [format!("{US_CORE}us-core-patient")]},
            "extension": [
                {
                    "url": format!("{US_CORE}us-core-race"),
                    "extension": [
                        {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race, "display": race_display}},
                        {"url": "text", "valueString": race_display}
                    ]
                },
                {
                    "url": format!("{US_CORE}us-core-ethnicity"),
                    "extension": [
                        {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": ethnicity, "display": ethnicity_display}},
                        {"url": "text", "valueString": ethnicity_display}
                    ]
                },
                {
                    "url": format!("{US_CORE}us-core-birthsex"),
                    "valueCode": if person.female { "F" } else { "M" }
                }
            ],
            "identifier": identifiers,
            "active": person.death.is_none(),
            "name": names_json,
            "telecom": telecom,
            "gender": if person.female { "female" } else { "male" },
            "birthDate": local_date(person.birth),
            "address": [{
                "use": "home",
                "line": [format!("{} {}", 1 + rng.below(9_999), rng.pick(STREETS))],
                "city": city,
                "state": state,
                "postalCode": format!("{zip}{:02}", rng.below(100)),
                "country": "US"
            }],
            "maritalStatus": concept("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", marital, marital_display),
            "communication": [{"language": concept("urn:ietf:bcp:47", lang, lang_display), "preferred": true}],
            "generalPractitioner": [logical(NPI, &person.pcp.0, &person.pcp.1)],
            "managingOrganization": logical(NPI, &clinic_npi, &clinic_name)
        });
        if let (Some(death), Some(object)) = (person.death, patient.as_object_mut()) {
            object.insert("deceasedDateTime".into(), json!(local_date_time(death)));
        }
        if rng.chance(0.03)
            && let Some(object) = patient.as_object_mut()
        {
            object.insert("multipleBirthBoolean".into(), json!(true));
        }
        patient
    }

    /// The visits of the record, in time order.
    fn plan(&mut self, person: &Person) -> Vec<Visit> {
        let end = person.death.unwrap_or(self.cohort.epoch);
        let rng = &mut self.rng;
        let years_back = 2 + rng.below(9);
        let start = person
            .birth
            .max(end - i64::try_from(years_back).unwrap_or(2) * YEAR);
        let mut visits = Vec::new();
        let add = |rng: &mut SplitMix64, visits: &mut Vec<Visit>, t: i64, purpose, clinic| {
            let t = if clinic { clinic_time(rng, t) } else { t };
            // Two days of room, so everything a visit produces lies before the record's end.
            if t >= start && t < end - 2 * DAY && t > person.birth {
                visits.push(Visit { start: t, purpose });
            }
        };

        // Check-ups: the well-child schedule, then yearly around the birthday.
        for &(months, _) in CHILD_SCHEDULE {
            if months >= 48 {
                break;
            }
            let t =
                person.birth + i64::from(months) * YEAR / 12 + 3 * DAY + random_secs(rng, 10 * DAY);
            add(
                rng,
                &mut visits,
                t,
                Purpose::Wellness {
                    months: Some(months),
                },
                true,
            );
        }
        let first_year = ((start - person.birth) / YEAR).max(4);
        let last_year = (end - person.birth) / YEAR;
        for year in first_year..=last_year {
            let adult = year >= 18;
            if adult && rng.chance(0.25) {
                continue;
            }
            let months = (!adult).then(|| u32::try_from(year * 12).unwrap_or(0));
            let t = person.birth + year * YEAR - 30 * DAY + random_secs(rng, 60 * DAY);
            add(rng, &mut visits, t, Purpose::Wellness { months }, true);
        }

        // Acute problems, seen in clinic or in the emergency department.
        let span = end - start;
        let years = span as f64 / YEAR as f64;
        let mid_age = person.age(start + span / 2);
        let rate = if mid_age < 5.0 {
            2.0
        } else if mid_age < 18.0 {
            1.0
        } else if mid_age < 65.0 {
            0.6
        } else {
            0.9
        };
        for _ in 0..poisson(rng, rate * years) {
            let t = start + random_secs(rng, span);
            let age = person.age(t);
            if let Some(def) = pick_acute(rng, age, person.female, None) {
                let clinic = def.setting == Setting::Clinic;
                add(rng, &mut visits, t, Purpose::Acute(def), clinic);
            }
        }
        let emergency_rate = if mid_age >= 65.0 { 0.12 } else { 0.06 };
        for _ in 0..poisson(rng, emergency_rate * years) {
            let t = start + random_secs(rng, span);
            if let Some(def) =
                pick_acute(rng, person.age(t), person.female, Some(Setting::Emergency))
            {
                add(rng, &mut visits, t, Purpose::Acute(def), false);
            }
        }

        // Chronic conditions: the visit that diagnoses them, then follow-ups.
        for (i, chronic) in person.chronic.iter().enumerate() {
            if chronic.onset >= start {
                // The day after onset, so the visit that records a condition follows its onset.
                add(
                    rng,
                    &mut visits,
                    chronic.onset + DAY,
                    Purpose::Diagnosis(i),
                    true,
                );
            }
            let from = chronic.onset.max(start) + DAY;
            if from >= end {
                continue;
            }
            let rate = chronic.def.follow_ups_per_year;
            for _ in 0..poisson(rng, rate * (end - from) as f64 / YEAR as f64) {
                let t = from + random_secs(rng, end - from);
                add(rng, &mut visits, t, Purpose::FollowUp(i), true);
            }
        }

        // Admissions: pneumonia, or an exacerbation of a chronic condition.
        let admission_rate =
            if mid_age >= 65.0 { 0.06 } else { 0.015 } + 0.01 * person.chronic.len() as f64;
        for _ in 0..poisson(rng, admission_rate * years) {
            let t = start + random_secs(rng, span);
            let serious: Vec<usize> = person
                .chronic
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.onset < t
                        && matches!(
                            c.def.kind,
                            Chronic::Copd
                                | Chronic::AtrialFibrillation
                                | Chronic::Diabetes
                                | Chronic::KidneyDisease
                                | Chronic::Hypertension
                                | Chronic::Asthma
                        )
                })
                .map(|(i, _)| i)
                .collect();
            let purpose = if serious.is_empty() || rng.chance(0.4) {
                ACUTE
                    .iter()
                    .find(|a| a.code == "233604007")
                    .map(|pneumonia| Purpose::Admission(Some(pneumonia), None))
            } else {
                Some(Purpose::Admission(None, Some(*rng.pick(&serious))))
            };
            if let Some(purpose) = purpose {
                add(rng, &mut visits, t, purpose, false);
            }
        }

        if visits.is_empty() && start < end - 2 * DAY {
            // Every record has at least one visit, so its conditions get recorded.
            let t = start + random_secs(rng, end - 2 * DAY - start);
            add(
                rng,
                &mut visits,
                t,
                Purpose::Wellness { months: None },
                false,
            );
        }
        visits.sort_by_key(|v| v.start);
        visits
    }

    fn encounter(
        &mut self,
        person: &Person,
        visit: &Visit,
        kind: EncounterType,
        end: i64,
        reason: Option<Value>,
    ) -> Enc {
        let id = self.next_id(ENCOUNTER);
        let hospital = kind.class != "AMB";
        let (npi, name) = if hospital {
            practitioner(self.cohort.seed, self.rng.below(PRACTITIONERS))
        } else {
            person.pcp.clone()
        };
        let performer = logical(NPI, &npi, &name);
        let (org_npi, org_name) = organization(person.city, person.clinic, hospital);
        let mut body = json!({
            "resourceType": "Encounter",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-encounter")]},
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.2", "value": format!("V{:010}", self.rng.below(10_000_000_000))}],
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": kind.class, "display": kind.class_display},
            "type": [concept(SNOMED, kind.code, kind.display)],
            "subject": self.subject(),
            "participant": [{
                "type": [coded("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF", "primary performer")],
                "individual": performer
            }],
            "period": {"start": local_date_time(visit.start), "end": local_date_time(end)},
            "serviceProvider": logical(NPI, &org_npi, &org_name)
        });
        if let Some(object) = body.as_object_mut() {
            if let Some(reason) = reason {
                let field = if reason.get("reference").is_some() {
                    "reasonReference"
                } else {
                    "reasonCode"
                };
                object.insert(field.into(), json!([reason]));
            }
            if kind.class == "IMP" {
                object.insert(
                    "hospitalization".into(),
                    json!({"dischargeDisposition": concept("http://terminology.hl7.org/CodeSystem/discharge-disposition", "home", "Home")}),
                );
            }
        }
        self.push(ENCOUNTER, id.clone(), body);
        Enc {
            id,
            start: visit.start,
            end,
            performer: logical(NPI, &npi, &name),
        }
    }

    fn visit(&mut self, person: &mut Person, visit: Visit) {
        let end_of_record = person.death.unwrap_or(self.cohort.epoch);
        match visit.purpose {
            Purpose::Wellness { months } => {
                let kind = if months.is_some() {
                    WELL_CHILD
                } else {
                    GENERAL_EXAM
                };
                let end =
                    (visit.start + (20 + random_secs(&mut self.rng, 40)) * 60).min(end_of_record);
                let enc = self.encounter(person, &visit, kind, end, None);
                self.record_known_conditions(person, &enc);
                self.wellness(person, &enc, months);
            }
            Purpose::Acute(def) => {
                let (kind, minutes) = match def.setting {
                    Setting::Clinic => (SYMPTOM, 15 + random_secs(&mut self.rng, 30)),
                    Setting::Emergency => (EMERGENCY, 120 + random_secs(&mut self.rng, 360)),
                };
                let end = (visit.start + minutes * 60).min(end_of_record);
                let reason = concept(SNOMED, def.code, def.display);
                let enc = self.encounter(person, &visit, kind, end, Some(reason));
                self.record_known_conditions(person, &enc);
                self.acute(person, &enc, def, kind.class == "EMER");
            }
            Purpose::Diagnosis(i) | Purpose::FollowUp(i) => {
                let diagnosis = matches!(visit.purpose, Purpose::Diagnosis(_));
                let kind = if diagnosis { PROBLEM } else { FOLLOW_UP };
                let end =
                    (visit.start + (15 + random_secs(&mut self.rng, 30)) * 60).min(end_of_record);
                let reason = match &person.chronic[i].condition {
                    Some(id) => reference("Condition", id),
                    None => {
                        let def = person.chronic[i].def;
                        concept(SNOMED, def.code, def.display)
                    }
                };
                let enc = self.encounter(person, &visit, kind, end, Some(reason));
                self.record_known_conditions(person, &enc);
                self.chronic_visit(person, &enc, i, diagnosis);
            }
            Purpose::Admission(acute, chronic) => {
                let days = 1 + random_secs(&mut self.rng, 6);
                let end = (visit.start + days * DAY + random_secs(&mut self.rng, 8 * 3600))
                    .min(end_of_record);
                let reason = match (acute, chronic) {
                    (Some(def), _) => Some(concept(SNOMED, def.code, def.display)),
                    (None, Some(i)) => {
                        let def = person.chronic[i].def;
                        Some(match &person.chronic[i].condition {
                            Some(id) => reference("Condition", id),
                            None => concept(SNOMED, def.code, def.display),
                        })
                    }
                    (None, None) => None,
                };
                let enc = self.encounter(person, &visit, ADMISSION, end, reason);
                self.record_known_conditions(person, &enc);
                self.admission(person, &enc, acute, chronic);
            }
        }
    }

    /// Records (as Conditions of this encounter) the chronic conditions that have begun but
    /// were not on file yet, and starts their treatment.
    fn record_known_conditions(&mut self, person: &mut Person, enc: &Enc) {
        for i in 0..person.chronic.len() {
            if person.chronic[i].condition.is_none() && person.chronic[i].onset <= enc.start {
                self.record_chronic(person, enc, i);
            }
        }
    }

    fn record_chronic(&mut self, person: &mut Person, enc: &Enc, i: usize) {
        let id = self.next_id(CONDITION);
        let state = &person.chronic[i];
        let def = state.def;
        let body = json!({
            "resourceType": "Condition",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-condition")]},
            "clinicalStatus": coded("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [coded("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
            "code": concept(SNOMED, def.code, def.display),
            "subject": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "onsetDateTime": local_date_time(state.onset),
            "recordedDate": local_date_time(enc.start),
            "recorder": enc.performer
        });
        self.push(CONDITION, id.clone(), body);
        let drugs = state.drugs.clone();
        person.chronic[i].condition = Some(id.clone());
        for drug in drugs {
            self.prescribe(enc, &drug, Some(&id), None, true);
        }
    }

    fn wellness(&mut self, person: &mut Person, enc: &Enc, months: Option<u32>) {
        let t = enc.start + (5 + random_secs(&mut self.rng, 10)) * 60;
        let age = person.age(t);
        self.body_measures(person, enc, t, age, true);
        self.blood_pressure(person, enc, t, age);
        self.heart_rate(person, enc, t, age);
        self.respiratory_rate(person, enc, t, age, 0.0);
        if self.rng.chance(0.25) {
            self.temperature(enc, t, false);
        }
        if self.rng.chance(0.25) {
            self.oxygen(person, enc, t, 0.0);
        }
        if age >= 6.0 && self.rng.chance(0.5) {
            let pain = if self.rng.chance(0.65) {
                0.0
            } else {
                1.0 + self.rng.below(3) as f64
            } + if person.has(Chronic::Osteoarthritis, t) {
                2.0
            } else {
                0.0
            };
            self.quantity_obs(enc, t, &PAIN, pain, false);
        }
        if age >= 18.0 {
            self.smoking_status(person, enc, t);
            let lab_time = enc.start + (20 + random_secs(&mut self.rng, 25)) * 60;
            let metabolic = person.has(Chronic::Hypertension, t)
                || person.has(Chronic::Diabetes, t)
                || person.has(Chronic::KidneyDisease, t);
            if self.rng.chance(0.25) {
                self.blood_count(person, enc, lab_time, false);
            }
            if self.rng.chance(if metabolic { 0.85 } else { 0.25 }) {
                self.metabolic_panel(person, enc, lab_time, false);
            }
            let lipids = person.has(Chronic::Hyperlipidemia, t) || person.has(Chronic::Diabetes, t);
            if age >= 20.0 && self.rng.chance(if lipids { 0.9 } else { 0.2 }) {
                self.lipid_panel(person, enc, lab_time);
            }
            if (person.has(Chronic::Diabetes, t) || person.has(Chronic::Prediabetes, t))
                && self.rng.chance(0.9)
            {
                self.hba1c(person, enc, lab_time);
            }
        }
        // Screening and care coordination.
        if !self.orders.is_empty() && self.rng.chance(0.6) {
            self.procedure(enc, MED_RECONCILIATION, None);
        }
        if age >= 12.0 && self.rng.chance(0.35) {
            self.procedure(enc, DEPRESSION_SCREENING, None);
        }
        if age >= 18.0 && self.rng.chance(0.25) {
            self.procedure(enc, NEEDS_ASSESSMENT, None);
        }
        if (45.0..75.0).contains(&age) && !self.colonoscopy && self.rng.chance(0.12) {
            self.colonoscopy = true;
            self.procedure(enc, COLONOSCOPY, None);
        }
        if person.female && (40.0..75.0).contains(&age) && self.rng.chance(0.45) {
            self.procedure(enc, MAMMOGRAPHY, None);
        }
        self.renew_prescriptions(person, enc, 0.8);
        self.vaccinate(person, enc, age, months);
    }

    fn acute(&mut self, person: &mut Person, enc: &Enc, def: &'static AcuteDef, emergency: bool) {
        let t = enc.start + (5 + random_secs(&mut self.rng, 15)) * 60;
        let age = person.age(t);
        let fever = self.rng.chance(def.fever);
        let condition = self.acute_condition(enc, def);
        self.blood_pressure(person, enc, t, age);
        self.heart_rate(person, enc, t, age);
        let breathing = if def.code == "233604007" { 6.0 } else { 0.0 };
        self.respiratory_rate(person, enc, t, age, breathing);
        if self.rng.chance(0.9) {
            self.temperature(enc, t, fever);
        }
        if emergency || self.rng.chance(0.6) {
            self.oxygen(person, enc, t, if breathing > 0.0 { 5.0 } else { 0.0 });
        }
        if age >= 6.0 && self.rng.chance(0.5) {
            let pain = 2.0 + self.rng.below(6) as f64;
            self.quantity_obs(enc, t, &PAIN, pain, false);
        }
        if self.rng.chance(0.3) {
            self.body_measures(person, enc, t, age, false);
        }
        let lab_time = enc.start + (30 + random_secs(&mut self.rng, 60)) * 60;
        if def.blood_count || (emergency && self.rng.chance(0.4)) {
            self.blood_count(person, enc, lab_time, fever);
        }
        if emergency && self.rng.chance(0.4) {
            self.metabolic_panel(person, enc, lab_time, true);
        }
        if let Some(procedure) = def.procedure
            && self.rng.chance(0.7)
        {
            self.procedure(enc, procedure, Some(&condition));
        }
        if !def.drugs.is_empty() && self.rng.chance(def.drug_chance) {
            let drug = *self.rng.pick(def.drugs);
            self.prescribe(enc, &drug, Some(&condition), Some(def.days.min(10)), false);
        }
        if !emergency {
            self.flu_shot(person, enc, age);
        }
    }

    fn acute_condition(&mut self, enc: &Enc, def: &AcuteDef) -> String {
        let id = self.next_id(CONDITION);
        let onset = (enc.start - random_secs(&mut self.rng, 4 * DAY) - 3600).max(self.birth);
        let abatement = enc.start
            + i64::try_from(def.days).unwrap_or(7) * DAY
            + random_secs(&mut self.rng, 5 * DAY);
        let resolved = abatement < self.cohort.epoch;
        let mut body = json!({
            "resourceType": "Condition",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-condition")]},
            "clinicalStatus": if resolved {
                coded("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved", "Resolved")
            } else {
                coded("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active")
            },
            "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [coded("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis", "Encounter Diagnosis")],
            "code": concept(SNOMED, def.code, def.display),
            "subject": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "onsetDateTime": local_date_time(onset),
            "recordedDate": local_date_time(enc.start),
            "recorder": enc.performer
        });
        if resolved && let Some(object) = body.as_object_mut() {
            object.insert(
                "abatementDateTime".into(),
                json!(local_date_time(abatement)),
            );
        }
        self.push(CONDITION, id.clone(), body);
        id
    }

    fn chronic_visit(&mut self, person: &mut Person, enc: &Enc, i: usize, diagnosis: bool) {
        let t = enc.start + (5 + random_secs(&mut self.rng, 10)) * 60;
        let age = person.age(t);
        let kind = person.chronic[i].def.kind;
        let condition = person.chronic[i].condition.clone();
        self.blood_pressure(person, enc, t, age);
        self.heart_rate(person, enc, t, age);
        if age >= 2.0 && self.rng.chance(0.5) {
            let height = person.height(age);
            let weight = person.weight(age, height) + self.rng.normal(0.0, 0.8);
            self.quantity_obs(enc, t, &WEIGHT, weight, false);
        }
        let lab_time = enc.start + (20 + random_secs(&mut self.rng, 25)) * 60;
        let p = if diagnosis { 1.0 } else { 0.6 };
        match kind {
            Chronic::Diabetes | Chronic::Prediabetes => {
                if self.rng.chance(p) {
                    self.hba1c(person, enc, lab_time);
                }
                if self.rng.chance(p * 0.7) {
                    self.metabolic_panel(person, enc, lab_time, false);
                }
            }
            Chronic::KidneyDisease | Chronic::Hypertension => {
                if self.rng.chance(p * 0.8) {
                    self.metabolic_panel(person, enc, lab_time, false);
                }
                if self.rng.chance(if diagnosis { 0.5 } else { 0.15 }) {
                    self.procedure(enc, ECG, condition.as_deref());
                }
            }
            Chronic::Hyperlipidemia => {
                if self.rng.chance(p) {
                    self.lipid_panel(person, enc, lab_time);
                }
            }
            Chronic::AtrialFibrillation => {
                if self.rng.chance(p * 0.8) {
                    self.procedure(enc, ECG, condition.as_deref());
                }
                if self.rng.chance(p * 0.4) {
                    self.blood_count(person, enc, lab_time, false);
                }
            }
            Chronic::Asthma | Chronic::Copd => {
                self.oxygen(person, enc, t, 0.0);
                self.respiratory_rate(person, enc, t, age, 0.0);
                if self.rng.chance(p * 0.6) {
                    self.procedure(enc, SPIROMETRY, condition.as_deref());
                }
            }
            Chronic::Depression => {
                if self.rng.chance(p * 0.7) {
                    self.procedure(enc, DEPRESSION_SCREENING, condition.as_deref());
                }
            }
            Chronic::Osteoarthritis | Chronic::Obesity => {}
        }
        if !diagnosis {
            self.renew_prescriptions(person, enc, 0.5);
            if !self.orders.is_empty() && self.rng.chance(0.3) {
                self.procedure(enc, MED_RECONCILIATION, None);
            }
        }
        self.flu_shot(person, enc, age);
    }

    fn admission(
        &mut self,
        person: &mut Person,
        enc: &Enc,
        acute: Option<&'static AcuteDef>,
        chronic: Option<usize>,
    ) {
        let condition = match (acute, chronic) {
            (Some(def), _) => Some(self.acute_condition(enc, def)),
            (None, Some(i)) => person.chronic[i].condition.clone(),
            (None, None) => None,
        };
        let kind = chronic.map(|i| person.chronic[i].def.kind);
        let pneumonia = acute.is_some();
        let breathing = pneumonia || matches!(kind, Some(Chronic::Copd | Chronic::Asthma));
        // Vital signs twice a day while admitted.
        let mut t = enc.start + 30 * 60;
        let mut day = 0;
        while t < enc.end {
            let age = person.age(t);
            self.blood_pressure(person, enc, t, age);
            self.heart_rate(person, enc, t, age);
            let recovery = (1.0 - 0.3 * day as f64).max(0.0);
            self.respiratory_rate(
                person,
                enc,
                t,
                age,
                if breathing { 5.0 * recovery } else { 0.0 },
            );
            if pneumonia || day < 2 || self.rng.chance(0.5) {
                self.temperature(enc, t, pneumonia && day < 2);
            }
            if breathing || day < 2 || self.rng.chance(0.5) {
                self.oxygen(person, enc, t, if breathing { 5.0 * recovery } else { 0.0 });
            }
            if day % 2 == 0 {
                let lab_time = t + 3600;
                if lab_time < enc.end {
                    if day == 0 || self.rng.chance(0.3) {
                        self.metabolic_panel(person, enc, lab_time, true);
                    }
                    if day == 0 {
                        self.blood_count(person, enc, lab_time, pneumonia);
                    }
                }
            }
            t += 12 * 3600 + random_secs(&mut self.rng, 3600);
            day += 1;
        }
        if pneumonia {
            self.procedure(enc, CHEST_XRAY, condition.as_deref());
        }
        if matches!(kind, Some(Chronic::AtrialFibrillation)) || self.rng.chance(0.4) {
            self.procedure(enc, ECG, condition.as_deref());
        }
        if let Some(def) = acute
            && let Some(drug) = def.drugs.first()
        {
            self.prescribe(
                enc,
                drug,
                condition.as_deref(),
                Some(def.days.min(10)),
                false,
            );
        }
        self.renew_prescriptions(person, enc, 0.3);
    }

    fn body_measures(&mut self, person: &Person, enc: &Enc, t: i64, age: f64, full: bool) {
        let height = person.height(age) + self.rng.normal(0.0, 0.4);
        let weight = (person.weight(age, height)
            + self.rng.normal(0.0, 0.8 * (age / 10.0).min(1.0) + 0.1))
        .max(2.0);
        if full {
            self.quantity_obs(enc, t, &HEIGHT, height, false);
        }
        self.quantity_obs(enc, t, &WEIGHT, weight, false);
        if full && age < 3.0 {
            let head = 35.0 + 12.0 * (age / 3.0).sqrt() + self.rng.normal(0.0, 0.6);
            self.quantity_obs(enc, t, &HEAD, head, false);
        }
        if full && age >= 2.0 {
            let bmi = weight / (height / 100.0).powi(2);
            self.quantity_obs(enc, t, &BMI, bmi, age >= 18.0);
        }
    }

    fn blood_pressure(&mut self, person: &Person, enc: &Enc, t: i64, age: f64) {
        if age < 3.0 {
            return;
        }
        let (mut systolic, mut diastolic) = if age < 18.0 {
            (90.0 + 1.5 * age, 55.0 + 1.0 * age)
        } else {
            let ageing = (age - 40.0).max(0.0);
            (
                person.systolic + 0.5 * ageing,
                person.diastolic + 0.15 * ageing,
            )
        };
        if person.has(Chronic::Hypertension, t) {
            let treated = if person.treated(Chronic::Hypertension) {
                -8.0
            } else {
                0.0
            };
            systolic += 20.0 + treated;
            diastolic += 9.0 + treated / 2.0;
        }
        let systolic = rounded(&SYSTOLIC, systolic + self.rng.normal(0.0, 8.0));
        let diastolic = rounded(
            &DIASTOLIC,
            (diastolic + self.rng.normal(0.0, 6.0)).min(systolic - 20.0),
        );
        let adult = age >= 18.0;
        let component = |test: &Test, value: f64| {
            let mut c = json!({
                "code": concept(LOINC, test.loinc, test.display),
                "valueQuantity": quantity(test, value)
            });
            if adult && let Some(object) = c.as_object_mut() {
                object.insert("interpretation".into(), interpretation(test, value));
            }
            c
        };
        let components = json!([
            component(&SYSTOLIC, systolic),
            component(&DIASTOLIC, diastolic)
        ]);
        let mut extra = Map::new();
        extra.insert("component".into(), components);
        self.observation(
            enc,
            t,
            Category::VitalSigns,
            concept(LOINC, BP_PANEL.0, BP_PANEL.1),
            extra,
            Some("bp"),
        );
    }

    fn heart_rate(&mut self, person: &Person, enc: &Enc, t: i64, age: f64) {
        let base = if age < 1.0 {
            130.0
        } else if age < 6.0 {
            110.0 - 5.0 * age
        } else if age < 18.0 {
            86.0 - (age - 6.0)
        } else {
            person.heart_rate
        };
        let (base, sd) = if person.has(Chronic::AtrialFibrillation, t) {
            (base + 12.0, 15.0)
        } else {
            (base, 6.0)
        };
        let value = (base + self.rng.normal(0.0, sd)).max(35.0);
        self.quantity_obs(enc, t, &HEART_RATE, value, age >= 18.0);
    }

    fn respiratory_rate(&mut self, person: &Person, enc: &Enc, t: i64, age: f64, extra: f64) {
        let base = if age < 1.0 {
            35.0
        } else if age < 6.0 {
            26.0
        } else if age < 12.0 {
            20.0
        } else {
            15.0
        } + if person.has(Chronic::Copd, t) {
            3.0
        } else {
            0.0
        };
        let value = (base + extra + self.rng.normal(0.0, 2.0)).max(8.0);
        self.quantity_obs(enc, t, &RESP_RATE, value, age >= 18.0);
    }

    fn temperature(&mut self, enc: &Enc, t: i64, fever: bool) {
        let value = if fever {
            self.rng.normal(38.5, 0.5)
        } else {
            self.rng.normal(36.8, 0.25)
        };
        self.quantity_obs(enc, t, &TEMPERATURE, value, true);
    }

    fn oxygen(&mut self, person: &Person, enc: &Enc, t: i64, drop: f64) {
        let copd = if person.has(Chronic::Copd, t) {
            4.0
        } else {
            0.0
        };
        let value = (98.0 - copd - drop + self.rng.normal(0.0, 0.8)).clamp(80.0, 100.0);
        self.quantity_obs(enc, t, &SPO2, value, true);
    }

    fn smoking_status(&mut self, person: &Person, enc: &Enc, t: i64) {
        let (code, display) = SMOKING[person.smoking];
        let mut extra = Map::new();
        extra.insert(
            "valueCodeableConcept".into(),
            concept(SNOMED, code, display),
        );
        self.observation_with_category(
            enc,
            t,
            ("social-history", "Social History"),
            concept(LOINC, SMOKING_STATUS.0, SMOKING_STATUS.1),
            extra,
            Some("us-core-smokingstatus"),
        );
    }

    fn blood_count(&mut self, person: &Person, enc: &Enc, t: i64, infection: bool) {
        let ckd = person.has(Chronic::KidneyDisease, t);
        let rng = &mut self.rng;
        let hemoglobin = if person.female {
            rng.normal(13.5, 1.0)
        } else {
            rng.normal(15.0, 1.1)
        } - if ckd { 1.5 } else { 0.0 };
        let hematocrit = hemoglobin * 2.95 + rng.normal(0.0, 1.0);
        let leukocytes = if infection {
            rng.normal(12.5, 3.0)
        } else {
            rng.normal(7.0, 1.7)
        }
        .max(1.5);
        let platelets = rng.normal(255.0, 55.0).max(40.0);
        let results = [
            (HEMOGLOBIN, hemoglobin),
            (HEMATOCRIT, hematocrit),
            (LEUKOCYTES, leukocytes),
            (PLATELETS, platelets),
        ];
        self.panel(enc, t, CBC_PANEL, &results);
    }

    fn metabolic_panel(&mut self, person: &Person, enc: &Enc, t: i64, acute: bool) {
        let age = person.age(t).max(18.0);
        let ckd = person.has(Chronic::KidneyDisease, t);
        let rng = &mut self.rng;
        let glucose = if person.has(Chronic::Diabetes, t) {
            rng.normal(155.0, 35.0)
        } else if person.has(Chronic::Prediabetes, t) {
            rng.normal(112.0, 8.0)
        } else {
            rng.normal(90.0, 9.0)
        } + if acute { 12.0 } else { 0.0 };
        let creatinine = if person.female {
            rng.normal(0.78, 0.12)
        } else {
            rng.normal(1.0, 0.15)
        } * if ckd { 2.0 } else { 1.0 };
        let creatinine = creatinine.max(0.3);
        let urea = if ckd {
            rng.normal(32.0, 9.0)
        } else {
            rng.normal(14.0, 4.0)
        }
        .max(3.0);
        let potassium = rng.normal(4.2, 0.35) + if ckd { 0.4 } else { 0.0 };
        // MDRD study equation, which is what the LOINC code names.
        let egfr = 175.0
            * rounded(&CREATININE, creatinine).powf(-1.154)
            * age.powf(-0.203)
            * if person.female { 0.742 } else { 1.0 };
        let results = [
            (GLUCOSE, glucose.max(40.0)),
            (UREA_NITROGEN, urea),
            (CREATININE, creatinine),
            (CALCIUM, rng.normal(9.5, 0.35)),
            (SODIUM, rng.normal(140.0, 2.2)),
            (POTASSIUM, potassium),
            (CHLORIDE, rng.normal(103.0, 2.5)),
            (CARBON_DIOXIDE, rng.normal(25.0, 2.0)),
            (EGFR, egfr),
        ];
        // Labs report an estimated GFR where kidney function matters: CKD and the elderly.
        let reported = if ckd || age >= 60.0 {
            &results[..]
        } else {
            &results[..results.len() - 1]
        };
        self.panel(enc, t, BMP_PANEL, reported);
    }

    fn lipid_panel(&mut self, person: &Person, enc: &Enc, t: i64) {
        let hyperlipidemia = person.has(Chronic::Hyperlipidemia, t);
        let statin = hyperlipidemia && person.treated(Chronic::Hyperlipidemia);
        let rng = &mut self.rng;
        let total = rng.normal(190.0, 28.0) + if hyperlipidemia { 45.0 } else { 0.0 }
            - if statin { 50.0 } else { 0.0 };
        let hdl = (rng.normal(50.0, 11.0) + if person.female { 8.0 } else { 0.0 }).max(20.0);
        let triglyceride = (rng.normal(125.0, 45.0)
            + if person.has(Chronic::Diabetes, t) {
                60.0
            } else {
                0.0
            })
        .max(35.0);
        // Friedewald: what labs reported before direct assays, and close to them.
        let ldl = (total - hdl - triglyceride / 5.0 + rng.normal(0.0, 6.0)).max(30.0);
        let results = [
            (CHOLESTEROL, total.max(hdl + ldl)),
            (TRIGLYCERIDE, triglyceride),
            (HDL, hdl),
            (LDL, ldl),
        ];
        self.panel(enc, t, LIPID_PANEL, &results);
    }

    fn hba1c(&mut self, person: &Person, enc: &Enc, t: i64) {
        let value = if person.has(Chronic::Diabetes, t) {
            self.rng.normal(7.4, 0.9)
                - if person.treated(Chronic::Diabetes) {
                    0.4
                } else {
                    0.0
                }
        } else if person.has(Chronic::Prediabetes, t) {
            self.rng.normal(6.0, 0.2)
        } else {
            self.rng.normal(5.3, 0.25)
        };
        self.panel(enc, t, A1C_REPORT, &[(HBA1C, value.max(4.0))]);
    }

    /// Lab results and the DiagnosticReport that groups them.
    fn panel(&mut self, enc: &Enc, t: i64, code: (&str, &str), results: &[(Test, f64)]) {
        let delay = 2 * 3600 + random_secs(&mut self.rng, 30 * 3600);
        let issued = self.reported(t, delay);
        let millis = self.rng.below(1000);
        let mut ids = Vec::with_capacity(results.len());
        for (test, value) in results {
            ids.push(self.quantity_obs_issued(enc, t, test, *value, true, issued, millis));
        }
        let id = self.next_id(DIAGNOSTIC_REPORT);
        let results: Vec<Value> = ids.iter().map(|id| reference("Observation", id)).collect();
        let body = json!({
            "resourceType": "DiagnosticReport",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-diagnosticreport-lab")]},
            "status": "final",
            "category": [coded("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
            "code": concept(LOINC, code.0, code.1),
            "subject": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "effectiveDateTime": local_date_time(t),
            "issued": instant(issued, millis),
            "performer": [enc.performer],
            "result": results
        });
        self.push(DIAGNOSTIC_REPORT, id, body);
    }

    fn quantity_obs(&mut self, enc: &Enc, t: i64, test: &Test, value: f64, judged: bool) -> String {
        let delay = 60 + random_secs(&mut self.rng, 600);
        let issued = self.reported(t, delay);
        let millis = self.rng.below(1000);
        self.quantity_obs_issued(enc, t, test, value, judged, issued, millis)
    }

    /// A quantitative observation; `judged` adds an interpretation (and, for labs, the
    /// reference range) when the test has a range that applies.
    #[allow(clippy::too_many_arguments)]
    fn quantity_obs_issued(
        &mut self,
        enc: &Enc,
        t: i64,
        test: &Test,
        value: f64,
        judged: bool,
        issued: i64,
        millis: u64,
    ) -> String {
        let value = rounded(test, value);
        let mut extra = Map::new();
        extra.insert("valueQuantity".into(), quantity(test, value));
        let has_range = test.low.is_some() || test.high.is_some();
        if judged && has_range {
            extra.insert("interpretation".into(), interpretation(test, value));
            if test.category == Category::Laboratory {
                extra.insert("referenceRange".into(), reference_range(test));
            }
        }
        let profile = match test.category {
            Category::VitalSigns => match test.loinc {
                "39156-5" => "bmi",
                "8302-2" => "bodyheight",
                "29463-7" => "bodyweight",
                "8867-4" => "heartrate",
                "9279-1" => "resprate",
                "8310-5" => "bodytemp",
                "9843-4" => "headcircum",
                "59408-5" => "oxygensat",
                _ => "vitalsigns",
            },
            Category::Laboratory => "us-core-observation-lab",
        };
        let category = match test.category {
            Category::VitalSigns => ("vital-signs", "Vital Signs"),
            Category::Laboratory => ("laboratory", "Laboratory"),
        };
        self.observation_full(
            enc,
            t,
            category,
            concept(LOINC, test.loinc, test.display),
            extra,
            Some(profile),
            issued,
            millis,
        )
    }

    fn observation(
        &mut self,
        enc: &Enc,
        t: i64,
        category: Category,
        code: Value,
        extra: Map<String, Value>,
        profile: Option<&str>,
    ) -> String {
        let category = match category {
            Category::VitalSigns => ("vital-signs", "Vital Signs"),
            Category::Laboratory => ("laboratory", "Laboratory"),
        };
        self.observation_with_category(enc, t, category, code, extra, profile)
    }

    fn observation_with_category(
        &mut self,
        enc: &Enc,
        t: i64,
        category: (&str, &str),
        code: Value,
        extra: Map<String, Value>,
        profile: Option<&str>,
    ) -> String {
        let delay = 60 + random_secs(&mut self.rng, 600);
        let issued = self.reported(t, delay);
        let millis = self.rng.below(1000);
        self.observation_full(enc, t, category, code, extra, profile, issued, millis)
    }

    #[allow(clippy::too_many_arguments)]
    fn observation_full(
        &mut self,
        enc: &Enc,
        t: i64,
        category: (&str, &str),
        code: Value,
        extra: Map<String, Value>,
        profile: Option<&str>,
        issued: i64,
        millis: u64,
    ) -> String {
        let id = self.next_id(OBSERVATION);
        let status = if self.rng.chance(0.985) {
            "final"
        } else {
            "amended"
        };
        let mut body = Map::new();
        body.insert("resourceType".into(), json!("Observation"));
        body.insert("id".into(), json!(id));
        if let Some(profile) = profile {
            let url = if profile.starts_with("us-core") {
                format!("{US_CORE}{profile}")
            } else {
                format!("http://hl7.org/fhir/StructureDefinition/{profile}")
            };
            body.insert("meta".into(), json!({"profile": [url]}));
        }
        body.insert("status".into(), json!(status));
        body.insert(
            "category".into(),
            json!([coded(
                "http://terminology.hl7.org/CodeSystem/observation-category",
                category.0,
                category.1
            )]),
        );
        body.insert("code".into(), code);
        body.insert("subject".into(), self.subject());
        body.insert("encounter".into(), reference("Encounter", &enc.id));
        body.insert("effectiveDateTime".into(), json!(local_date_time(t)));
        body.insert("issued".into(), json!(instant(issued, millis)));
        body.insert("performer".into(), json!([enc.performer]));
        body.extend(extra);
        self.push(OBSERVATION, id.clone(), Value::Object(body));
        id
    }

    fn procedure(&mut self, enc: &Enc, (code, display): Procedure, reason: Option<&str>) {
        let id = self.next_id(PROCEDURE);
        let start = enc.start + (10 + random_secs(&mut self.rng, 20)) * 60;
        let start = start.min(enc.end);
        let mut body = json!({
            "resourceType": "Procedure",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-procedure")]},
            "status": "completed",
            "code": concept(SNOMED, code, display),
            "subject": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "performedDateTime": local_date_time(start),
            "performer": [{"actor": enc.performer}]
        });
        if let (Some(reason), Some(object)) = (reason, body.as_object_mut()) {
            object.insert(
                "reasonReference".into(),
                json!([reference("Condition", reason)]),
            );
        }
        self.push(PROCEDURE, id, body);
    }

    /// Orders `drug`; `course_days` for a short course, or a chronic prescription with refills.
    fn prescribe(
        &mut self,
        enc: &Enc,
        drug: &Drug,
        reason: Option<&str>,
        course_days: Option<u64>,
        chronic: bool,
    ) {
        let id = self.next_id(MEDICATION_REQUEST);
        let authored = (enc.start + (10 + random_secs(&mut self.rng, 20)) * 60).min(enc.end);
        let (route_code, route_display) = match drug.route {
            Route::Oral => ("26643006", "Oral route"),
            Route::Inhaled => ("447694001", "Respiratory tract route (qualifier value)"),
        };
        let verb = match drug.route {
            Route::Oral => "by mouth",
            Route::Inhaled => "inhaled",
        };
        let plural = if drug.dose > 1.0 { "s" } else { "" };
        let text = if drug.as_needed {
            format!(
                "Take {} {}{plural} {verb} as needed, up to {} times a day",
                drug.dose, drug.unit, drug.per_day
            )
        } else {
            let times = match drug.per_day {
                1 => "once a day".to_owned(),
                2 => "twice a day".to_owned(),
                n => format!("{n} times a day"),
            };
            format!("Take {} {}{plural} {verb} {times}", drug.dose, drug.unit)
        };
        let supply_days = course_days.unwrap_or(if self.rng.chance(0.5) { 30 } else { 90 });
        let units = drug.dose * f64::from(drug.per_day) * supply_days as f64;
        let mut body = json!({
            "resourceType": "MedicationRequest",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-medicationrequest")]},
            "status": "completed",
            "intent": "order",
            "medicationCodeableConcept": concept(RXNORM, drug.rxnorm, drug.display),
            "subject": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "authoredOn": local_date_time(authored),
            "requester": enc.performer,
            "dosageInstruction": [{
                "sequence": 1,
                "text": text,
                "timing": {"repeat": {"frequency": drug.per_day, "period": 1, "periodUnit": "d"}},
                "asNeededBoolean": drug.as_needed,
                "route": concept(SNOMED, route_code, route_display),
                "doseAndRate": [{"doseQuantity": {"value": number(drug.dose, 0), "unit": drug.unit}}]
            }],
            "dispenseRequest": {
                "numberOfRepeatsAllowed": if chronic { 3 } else { 0 },
                "quantity": {"value": number(units, 0), "unit": drug.unit},
                "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"}
            }
        });
        if let (Some(reason), Some(object)) = (reason, body.as_object_mut()) {
            object.insert(
                "reasonReference".into(),
                json!([reference("Condition", reason)]),
            );
        }
        let at = self.push(MEDICATION_REQUEST, id, body);
        if chronic {
            match self.orders.iter_mut().find(|o| o.rxnorm == drug.rxnorm) {
                Some(order) => order.latest = at,
                None => self.orders.push(Order {
                    rxnorm: drug.rxnorm,
                    latest: at,
                }),
            }
        } else if authored + i64::try_from(supply_days).unwrap_or(0) * DAY > self.cohort.epoch {
            self.set_status(at, "active");
        }
    }

    /// Renews each recorded chronic condition's drugs with probability `p`.
    fn renew_prescriptions(&mut self, person: &Person, enc: &Enc, p: f64) {
        for state in &person.chronic {
            let Some(condition) = &state.condition else {
                continue;
            };
            for drug in &state.drugs {
                if self.rng.chance(p) {
                    self.prescribe(enc, drug, Some(condition), None, true);
                }
            }
        }
    }

    fn set_status(&mut self, at: usize, status: &str) {
        if let Some(pending) = self.out.get_mut(at) {
            pending.body.insert("status".into(), json!(status));
        }
    }

    fn vaccinate(&mut self, person: &Person, enc: &Enc, age: f64, months: Option<u32>) {
        let mut due: Vec<Vaccine> = Vec::new();
        if let Some(months) = months
            && let Some((_, vaccines)) = CHILD_SCHEDULE.iter().find(|(m, _)| *m == months)
        {
            due.extend_from_slice(vaccines);
        }
        let t = enc.start;
        if age >= 19.0 {
            if self.last_tetanus == i64::MIN {
                // Most adults had their last booster some years before the record starts.
                self.last_tetanus = t - random_secs(&mut self.rng, 14 * YEAR);
            }
            if t - self.last_tetanus > 10 * YEAR && self.rng.chance(0.6) {
                due.push(TD);
                self.last_tetanus = t;
            }
        }
        if age >= 65.0 && self.pneumococcal < 2 && self.rng.chance(0.5) {
            due.push(if self.pneumococcal == 0 {
                PCV13
            } else {
                PPSV23
            });
            self.pneumococcal += 1;
        }
        if age >= 50.0 && self.zoster < 2 && self.rng.chance(0.3) {
            due.push(ZOSTER);
            self.zoster += 1;
        }
        let covid_era = (local_ymd(2021, 1, 1)..local_ymd(2023, 1, 1)).contains(&t);
        if covid_era && age >= 5.0 && self.covid < 3 && self.rng.chance(0.6) {
            due.push(COVID);
            self.covid += 1;
        }
        for vaccine in due {
            self.immunization(enc, vaccine, age);
        }
        self.flu_shot(person, enc, age);
    }

    /// A seasonal flu shot at the first visit of the season that takes it up.
    fn flu_shot(&mut self, _person: &Person, enc: &Enc, age: f64) {
        let month = local_month(enc.start);
        if !(month >= 9 || month <= 1) || age < 0.5 {
            return;
        }
        let season = local_year(enc.start) - i64::from(month <= 1);
        if self.flu_seasons.contains(&season) {
            return;
        }
        let p = if age >= 65.0 {
            0.75
        } else if age < 18.0 {
            0.55
        } else {
            0.45
        };
        if self.rng.chance(p) {
            self.flu_seasons.push(season);
            self.immunization(enc, FLU, age);
        }
    }

    fn immunization(&mut self, enc: &Enc, (code, display): Vaccine, age: f64) {
        let id = self.next_id(IMMUNIZATION);
        let at = (enc.start + (15 + random_secs(&mut self.rng, 20)) * 60).min(enc.end);
        let oral = code == ROTAVIRUS.0;
        let site = if age < 3.0 {
            if self.rng.chance(0.5) {
                ("LT", "left thigh")
            } else {
                ("RT", "right thigh")
            }
        } else if self.rng.chance(0.7) {
            ("LA", "left arm")
        } else {
            ("RA", "right arm")
        };
        let lot = format!(
            "{}{}{:05}",
            char::from(b'A' + u8::try_from(self.rng.below(26)).unwrap_or(0)),
            char::from(b'A' + u8::try_from(self.rng.below(26)).unwrap_or(0)),
            self.rng.below(100_000)
        );
        let mut body = json!({
            "resourceType": "Immunization",
            "id": id,
            "meta": {"profile": [format!("{US_CORE}us-core-immunization")]},
            "status": "completed",
            "vaccineCode": concept(CVX, code, display),
            "patient": self.subject(),
            "encounter": reference("Encounter", &enc.id),
            "occurrenceDateTime": local_date_time(at),
            "recorded": local_date_time(at),
            "primarySource": true,
            "lotNumber": lot,
            "performer": [{"actor": enc.performer}],
            "doseQuantity": {"value": number(if oral { 1.0 } else { 0.5 }, 1), "unit": "mL", "system": UCUM, "code": "mL"}
        });
        if let Some(object) = body.as_object_mut() {
            if oral {
                object.insert(
                    "route".into(),
                    concept(
                        "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
                        "PO",
                        "Swallow, oral",
                    ),
                );
            } else {
                object.insert(
                    "site".into(),
                    concept(
                        "http://terminology.hl7.org/CodeSystem/v3-ActSite",
                        site.0,
                        site.1,
                    ),
                );
                object.insert(
                    "route".into(),
                    concept(
                        "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
                        "IM",
                        "Injection, intramuscular",
                    ),
                );
            }
        }
        self.push(IMMUNIZATION, id, body);
    }

    /// Fixes the status of ongoing prescriptions (the latest order of each drug is active
    /// unless the patient died) and serializes everything.
    fn finish(mut self, person: &Person) -> PatientRecord {
        let latest: Vec<usize> = self.orders.iter().map(|o| o.latest).collect();
        let status = if person.death.is_some() {
            "stopped"
        } else {
            "active"
        };
        for at in latest {
            self.set_status(at, status);
        }
        let resources = self
            .out
            .into_iter()
            .map(|pending| GeneratedResource {
                resource_type: RESOURCE_TYPES[pending.kind],
                id: pending.id,
                json: Value::Object(pending.body).to_string(),
            })
            .collect();
        PatientRecord {
            index: self.index,
            resources,
        }
    }
}

/// An acute problem plausible at `age`, weighted by frequency (urinary infections mostly in
/// women); `setting` restricts the choice to problems seen there.
fn pick_acute(
    rng: &mut SplitMix64,
    age: f64,
    female: bool,
    setting: Option<Setting>,
) -> Option<&'static AcuteDef> {
    let weight = |def: &AcuteDef| {
        if age < def.ages.0 || age >= def.ages.1 || setting.is_some_and(|s| s != def.setting) {
            return 0.0;
        }
        if def.code == "68566005" && !female {
            def.weight * 0.15
        } else {
            def.weight
        }
    };
    let total: f64 = ACUTE.iter().map(weight).sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = rng.unit() * total;
    for def in ACUTE {
        point -= weight(def);
        if point < 0.0 {
            return Some(def);
        }
    }
    ACUTE.last()
}
