//! Clinical vocabularies of the cohort generator: LOINC tests, SNOMED CT conditions and
//! procedures, RxNorm drugs and CVX vaccines, with the value models that make results plausible.

/// Code system URIs, as FHIR R4 names them.
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub(crate) const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";
pub(crate) const NPI: &str = "http://hl7.org/fhir/sid/us-npi";

/// How an observation is filed (`Observation.category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    VitalSigns,
    Laboratory,
}

/// A quantitative LOINC observation: what it is, its UCUM unit, how it is rounded and its
/// (adult) reference range, either end of which may be open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Test {
    pub(crate) loinc: &'static str,
    pub(crate) display: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) decimals: i32,
    pub(crate) low: Option<f64>,
    pub(crate) high: Option<f64>,
    pub(crate) category: Category,
}

const fn vital(
    loinc: &'static str,
    display: &'static str,
    unit: &'static str,
    decimals: i32,
    range: (Option<f64>, Option<f64>),
) -> Test {
    Test {
        loinc,
        display,
        unit,
        decimals,
        low: range.0,
        high: range.1,
        category: Category::VitalSigns,
    }
}

const fn lab(
    loinc: &'static str,
    display: &'static str,
    unit: &'static str,
    decimals: i32,
    range: (Option<f64>, Option<f64>),
) -> Test {
    Test {
        loinc,
        display,
        unit,
        decimals,
        low: range.0,
        high: range.1,
        category: Category::Laboratory,
    }
}

pub(crate) const HEIGHT: Test = vital("8302-2", "Body height", "cm", 1, (None, None));
pub(crate) const HEAD: Test = vital(
    "9843-4",
    "Head Occipital-frontal circumference",
    "cm",
    1,
    (None, None),
);
pub(crate) const WEIGHT: Test = vital("29463-7", "Body weight", "kg", 1, (None, None));
pub(crate) const BMI: Test = vital(
    "39156-5",
    "Body mass index (BMI) [Ratio]",
    "kg/m2",
    1,
    (Some(18.5), Some(25.0)),
);
pub(crate) const HEART_RATE: Test =
    vital("8867-4", "Heart rate", "/min", 0, (Some(60.0), Some(100.0)));
pub(crate) const RESP_RATE: Test = vital(
    "9279-1",
    "Respiratory rate",
    "/min",
    0,
    (Some(12.0), Some(20.0)),
);
pub(crate) const TEMPERATURE: Test = vital(
    "8310-5",
    "Body temperature",
    "Cel",
    1,
    (Some(36.1), Some(37.5)),
);
pub(crate) const SPO2: Test = vital(
    "59408-5",
    "Oxygen saturation in Arterial blood by Pulse oximetry",
    "%",
    0,
    (Some(95.0), Some(100.0)),
);
pub(crate) const PAIN: Test = vital(
    "72514-3",
    "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
    "{score}",
    0,
    (None, None),
);
pub(crate) const SYSTOLIC: Test = vital(
    "8480-6",
    "Systolic blood pressure",
    "mm[Hg]",
    0,
    (Some(90.0), Some(130.0)),
);
pub(crate) const DIASTOLIC: Test = vital(
    "8462-4",
    "Diastolic blood pressure",
    "mm[Hg]",
    0,
    (Some(60.0), Some(85.0)),
);
pub(crate) const BP_PANEL: (&str, &str) =
    ("85354-9", "Blood pressure panel with all children optional");

pub(crate) const HEMOGLOBIN: Test = lab(
    "718-7",
    "Hemoglobin [Mass/volume] in Blood",
    "g/dL",
    1,
    (Some(12.0), Some(17.5)),
);
pub(crate) const HEMATOCRIT: Test = lab(
    "4544-3",
    "Hematocrit [Volume Fraction] of Blood by Automated count",
    "%",
    1,
    (Some(36.0), Some(50.0)),
);
pub(crate) const LEUKOCYTES: Test = lab(
    "6690-2",
    "Leukocytes [#/volume] in Blood by Automated count",
    "10*3/uL",
    1,
    (Some(4.5), Some(11.0)),
);
pub(crate) const PLATELETS: Test = lab(
    "777-3",
    "Platelets [#/volume] in Blood by Automated count",
    "10*3/uL",
    0,
    (Some(150.0), Some(400.0)),
);
pub(crate) const GLUCOSE: Test = lab(
    "2345-7",
    "Glucose [Mass/volume] in Serum or Plasma",
    "mg/dL",
    0,
    (Some(70.0), Some(99.0)),
);
pub(crate) const UREA_NITROGEN: Test = lab(
    "6299-2",
    "Urea nitrogen [Mass/volume] in Blood",
    "mg/dL",
    0,
    (Some(7.0), Some(20.0)),
);
pub(crate) const CREATININE: Test = lab(
    "2160-0",
    "Creatinine [Mass/volume] in Serum or Plasma",
    "mg/dL",
    2,
    (Some(0.6), Some(1.3)),
);
pub(crate) const CALCIUM: Test = lab(
    "17861-6",
    "Calcium [Mass/volume] in Serum or Plasma",
    "mg/dL",
    1,
    (Some(8.6), Some(10.3)),
);
pub(crate) const SODIUM: Test = lab(
    "2951-2",
    "Sodium [Moles/volume] in Serum or Plasma",
    "mmol/L",
    0,
    (Some(136.0), Some(145.0)),
);
pub(crate) const POTASSIUM: Test = lab(
    "2823-3",
    "Potassium [Moles/volume] in Serum or Plasma",
    "mmol/L",
    1,
    (Some(3.5), Some(5.1)),
);
pub(crate) const CHLORIDE: Test = lab(
    "2075-0",
    "Chloride [Moles/volume] in Serum or Plasma",
    "mmol/L",
    0,
    (Some(98.0), Some(107.0)),
);
pub(crate) const CARBON_DIOXIDE: Test = lab(
    "2028-9",
    "Carbon dioxide, total [Moles/volume] in Serum or Plasma",
    "mmol/L",
    0,
    (Some(22.0), Some(29.0)),
);
pub(crate) const EGFR: Test = lab(
    "33914-3",
    "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma by Creatinine-based formula (MDRD)",
    "mL/min/{1.73_m2}",
    0,
    (Some(60.0), None),
);
pub(crate) const CHOLESTEROL: Test = lab(
    "2093-3",
    "Cholesterol [Mass/volume] in Serum or Plasma",
    "mg/dL",
    0,
    (None, Some(200.0)),
);
pub(crate) const TRIGLYCERIDE: Test = lab(
    "2571-8",
    "Triglyceride [Mass/volume] in Serum or Plasma",
    "mg/dL",
    0,
    (None, Some(150.0)),
);
pub(crate) const HDL: Test = lab(
    "2085-9",
    "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
    "mg/dL",
    0,
    (Some(40.0), None),
);
pub(crate) const LDL: Test = lab(
    "18262-6",
    "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
    "mg/dL",
    0,
    (None, Some(100.0)),
);
pub(crate) const HBA1C: Test = lab(
    "4548-4",
    "Hemoglobin A1c/Hemoglobin.total in Blood",
    "%",
    1,
    (Some(4.0), Some(5.6)),
);

/// LOINC codes of the DiagnosticReports that group lab results.
pub(crate) const CBC_PANEL: (&str, &str) = ("58410-2", "CBC panel - Blood by Automated count");
pub(crate) const BMP_PANEL: (&str, &str) = ("51990-0", "Basic metabolic panel - Blood");
pub(crate) const LIPID_PANEL: (&str, &str) =
    ("57698-3", "Lipid panel with direct LDL - Serum or Plasma");
pub(crate) const A1C_REPORT: (&str, &str) = (HBA1C.loinc, HBA1C.display);

pub(crate) const SMOKING_STATUS: (&str, &str) = ("72166-2", "Tobacco smoking status");
/// SNOMED answers to [`SMOKING_STATUS`], indexed by `Person::smoking`.
pub(crate) const SMOKING: [(&str, &str); 3] = [
    ("266919005", "Never smoked tobacco (finding)"),
    ("8517006", "Ex-smoker (finding)"),
    ("449868002", "Smokes tobacco daily (finding)"),
];

/// Encounter kinds: SNOMED type and v3 ActCode class.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncounterType {
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) class: &'static str,
    pub(crate) class_display: &'static str,
}

const fn encounter_type(
    code: &'static str,
    display: &'static str,
    class: &'static str,
    class_display: &'static str,
) -> EncounterType {
    EncounterType {
        code,
        display,
        class,
        class_display,
    }
}

pub(crate) const GENERAL_EXAM: EncounterType = encounter_type(
    "162673000",
    "General examination of patient (procedure)",
    "AMB",
    "ambulatory",
);
pub(crate) const WELL_CHILD: EncounterType = encounter_type(
    "410620009",
    "Well child visit (procedure)",
    "AMB",
    "ambulatory",
);
pub(crate) const SYMPTOM: EncounterType = encounter_type(
    "185345009",
    "Encounter for symptom (procedure)",
    "AMB",
    "ambulatory",
);
pub(crate) const FOLLOW_UP: EncounterType = encounter_type(
    "390906007",
    "Follow-up encounter (procedure)",
    "AMB",
    "ambulatory",
);
pub(crate) const PROBLEM: EncounterType = encounter_type(
    "185347001",
    "Encounter for problem (procedure)",
    "AMB",
    "ambulatory",
);
pub(crate) const EMERGENCY: EncounterType = encounter_type(
    "50849002",
    "Emergency room admission (procedure)",
    "EMER",
    "emergency",
);
pub(crate) const ADMISSION: EncounterType = encounter_type(
    "32485007",
    "Hospital admission (procedure)",
    "IMP",
    "inpatient encounter",
);

/// How a drug is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Oral,
    Inhaled,
}

/// An RxNorm drug with its usual sig.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drug {
    pub(crate) rxnorm: &'static str,
    pub(crate) display: &'static str,
    pub(crate) route: Route,
    pub(crate) dose: f64,
    pub(crate) unit: &'static str,
    /// Doses per day (for as-needed drugs: the most per day).
    pub(crate) per_day: u32,
    pub(crate) as_needed: bool,
}

const fn drug(
    rxnorm: &'static str,
    display: &'static str,
    route: Route,
    (dose, unit): (f64, &'static str),
    per_day: u32,
    as_needed: bool,
) -> Drug {
    Drug {
        rxnorm,
        display,
        route,
        dose,
        unit,
        per_day,
        as_needed,
    }
}

pub(crate) const LISINOPRIL: Drug = drug(
    "314076",
    "lisinopril 10 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const AMLODIPINE: Drug = drug(
    "197361",
    "amlodipine 5 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const HCTZ: Drug = drug(
    "310798",
    "Hydrochlorothiazide 25 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const METFORMIN: Drug = drug(
    "860975",
    "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const SIMVASTATIN: Drug = drug(
    "312961",
    "Simvastatin 20 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const ATORVASTATIN: Drug = drug(
    "259255",
    "atorvastatin 80 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const FLUTICASONE: Drug = drug(
    "895994",
    "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    Route::Inhaled,
    (2.0, "puff"),
    2,
    false,
);
pub(crate) const ALBUTEROL: Drug = drug(
    "745679",
    "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    Route::Inhaled,
    (2.0, "puff"),
    4,
    true,
);
pub(crate) const FLUOXETINE: Drug = drug(
    "310385",
    "Fluoxetine 20 MG Oral Capsule",
    Route::Oral,
    (1.0, "capsule"),
    1,
    false,
);
pub(crate) const WARFARIN: Drug = drug(
    "855332",
    "Warfarin Sodium 5 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const METOPROLOL: Drug = drug(
    "866412",
    "24 HR Metoprolol succinate 100 MG Extended Release Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    1,
    false,
);
pub(crate) const NAPROXEN: Drug = drug(
    "849574",
    "Naproxen sodium 220 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    2,
    true,
);
pub(crate) const ACETAMINOPHEN: Drug = drug(
    "313782",
    "Acetaminophen 325 MG Oral Tablet",
    Route::Oral,
    (2.0, "tablet"),
    4,
    true,
);
pub(crate) const IBUPROFEN: Drug = drug(
    "310965",
    "Ibuprofen 200 MG Oral Tablet",
    Route::Oral,
    (2.0, "tablet"),
    3,
    true,
);
pub(crate) const AMOXICILLIN: Drug = drug(
    "308182",
    "Amoxicillin 250 MG Oral Capsule",
    Route::Oral,
    (2.0, "capsule"),
    3,
    false,
);
pub(crate) const PENICILLIN_V: Drug = drug(
    "834061",
    "Penicillin V Potassium 250 MG Oral Tablet",
    Route::Oral,
    (2.0, "tablet"),
    2,
    false,
);
pub(crate) const AMOX_CLAV: Drug = drug(
    "562251",
    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
    Route::Oral,
    (2.0, "tablet"),
    3,
    false,
);
pub(crate) const CIPROFLOXACIN: Drug = drug(
    "309309",
    "Ciprofloxacin 500 MG Oral Tablet",
    Route::Oral,
    (1.0, "tablet"),
    2,
    false,
);

/// A SNOMED CT procedure.
pub(crate) type Procedure = (&'static str, &'static str);

pub(crate) const MED_RECONCILIATION: Procedure =
    ("430193006", "Medication Reconciliation (procedure)");
pub(crate) const DEPRESSION_SCREENING: Procedure =
    ("171207006", "Depression screening (procedure)");
pub(crate) const NEEDS_ASSESSMENT: Procedure = (
    "710824005",
    "Assessment of health and social care needs (procedure)",
);
pub(crate) const ECG: Procedure = ("29303009", "Electrocardiographic procedure");
pub(crate) const CHEST_XRAY: Procedure = ("399208008", "Plain chest X-ray (procedure)");
pub(crate) const THROAT_CULTURE: Procedure = ("117015009", "Throat culture (procedure)");
pub(crate) const SUTURE: Procedure = ("288086009", "Suture open wound (procedure)");
pub(crate) const COLONOSCOPY: Procedure = ("73761001", "Colonoscopy (procedure)");
pub(crate) const MAMMOGRAPHY: Procedure = ("24623002", "Screening mammography (procedure)");
pub(crate) const SPIROMETRY: Procedure = ("127783003", "Spirometry (procedure)");

/// Long-term conditions; [`CHRONIC`] gives their codes and treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chronic {
    Hypertension,
    Diabetes,
    Prediabetes,
    Hyperlipidemia,
    Asthma,
    Copd,
    KidneyDisease,
    Depression,
    AtrialFibrillation,
    Osteoarthritis,
    Obesity,
}

/// A chronic condition: SNOMED code, youngest onset age, follow-up visits per year, and the
/// drugs it is treated with (one of `first_line`, plus every drug of `always`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChronicDef {
    pub(crate) kind: Chronic,
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) min_age: f64,
    pub(crate) follow_ups_per_year: f64,
    pub(crate) first_line: &'static [Drug],
    pub(crate) always: &'static [Drug],
}

const fn chronic(
    kind: Chronic,
    (code, display): (&'static str, &'static str),
    min_age: f64,
    follow_ups_per_year: f64,
    first_line: &'static [Drug],
    always: &'static [Drug],
) -> ChronicDef {
    ChronicDef {
        kind,
        code,
        display,
        min_age,
        follow_ups_per_year,
        first_line,
        always,
    }
}

pub(crate) const CHRONIC: &[ChronicDef] = &[
    chronic(
        Chronic::Hypertension,
        (
            "38341003",
            "Hypertensive disorder, systemic arterial (disorder)",
        ),
        25.0,
        1.0,
        &[LISINOPRIL, AMLODIPINE, HCTZ],
        &[],
    ),
    chronic(
        Chronic::Diabetes,
        ("44054006", "Diabetes mellitus type 2 (disorder)"),
        30.0,
        2.0,
        &[],
        &[METFORMIN],
    ),
    chronic(
        Chronic::Prediabetes,
        ("15777000", "Prediabetes (finding)"),
        25.0,
        0.3,
        &[],
        &[],
    ),
    chronic(
        Chronic::Hyperlipidemia,
        ("55822004", "Hyperlipidemia (disorder)"),
        30.0,
        0.5,
        &[SIMVASTATIN, ATORVASTATIN],
        &[],
    ),
    chronic(
        Chronic::Asthma,
        ("195967001", "Asthma (disorder)"),
        3.0,
        0.7,
        &[],
        &[FLUTICASONE, ALBUTEROL],
    ),
    chronic(
        Chronic::Copd,
        ("13645005", "Chronic obstructive lung disease (disorder)"),
        45.0,
        1.0,
        &[],
        &[ALBUTEROL],
    ),
    chronic(
        Chronic::KidneyDisease,
        ("709044004", "Chronic kidney disease (disorder)"),
        50.0,
        1.0,
        &[],
        &[],
    ),
    chronic(
        Chronic::Depression,
        ("35489007", "Depressive disorder (disorder)"),
        14.0,
        1.5,
        &[],
        &[FLUOXETINE],
    ),
    chronic(
        Chronic::AtrialFibrillation,
        ("49436004", "Atrial fibrillation (disorder)"),
        55.0,
        1.5,
        &[],
        &[WARFARIN, METOPROLOL],
    ),
    chronic(
        Chronic::Osteoarthritis,
        ("239873007", "Osteoarthritis of knee (disorder)"),
        45.0,
        0.4,
        &[NAPROXEN, ACETAMINOPHEN],
        &[],
    ),
    chronic(
        Chronic::Obesity,
        ("162864005", "Body mass index 30+ - obesity (finding)"),
        18.0,
        0.0,
        &[],
        &[],
    ),
];

/// Where an acute problem is usually seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    Clinic,
    Emergency,
}

/// An acute problem: SNOMED code, days to resolution, ages it occurs at, relative frequency,
/// treatment and work-up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcuteDef {
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) days: u64,
    pub(crate) ages: (f64, f64),
    pub(crate) weight: f64,
    pub(crate) setting: Setting,
    pub(crate) fever: f64,
    pub(crate) drugs: &'static [Drug],
    pub(crate) drug_chance: f64,
    pub(crate) procedure: Option<Procedure>,
    pub(crate) blood_count: bool,
}

#[allow(clippy::too_many_arguments)]
const fn acute(
    (code, display): (&'static str, &'static str),
    days: u64,
    ages: (f64, f64),
    weight: f64,
    setting: Setting,
    fever: f64,
    (drugs, drug_chance): (&'static [Drug], f64),
    procedure: Option<Procedure>,
    blood_count: bool,
) -> AcuteDef {
    AcuteDef {
        code,
        display,
        days,
        ages,
        weight,
        setting,
        fever,
        drugs,
        drug_chance,
        procedure,
        blood_count,
    }
}

pub(crate) const ACUTE: &[AcuteDef] = &[
    acute(
        ("444814009", "Viral sinusitis (disorder)"),
        14,
        (2.0, 120.0),
        10.0,
        Setting::Clinic,
        0.2,
        (&[AMOXICILLIN], 0.3),
        None,
        false,
    ),
    acute(
        ("10509002", "Acute bronchitis (disorder)"),
        14,
        (0.0, 120.0),
        7.0,
        Setting::Clinic,
        0.4,
        (&[ACETAMINOPHEN], 0.6),
        Some(CHEST_XRAY),
        false,
    ),
    acute(
        ("195662009", "Acute viral pharyngitis (disorder)"),
        7,
        (1.0, 120.0),
        8.0,
        Setting::Clinic,
        0.5,
        (&[ACETAMINOPHEN, IBUPROFEN], 0.4),
        Some(THROAT_CULTURE),
        false,
    ),
    acute(
        ("43878008", "Streptococcal sore throat (disorder)"),
        10,
        (3.0, 60.0),
        3.0,
        Setting::Clinic,
        0.7,
        (&[PENICILLIN_V, AMOXICILLIN], 1.0),
        Some(THROAT_CULTURE),
        false,
    ),
    acute(
        ("65363002", "Otitis media (disorder)"),
        10,
        (0.0, 12.0),
        12.0,
        Setting::Clinic,
        0.5,
        (&[AMOXICILLIN], 0.8),
        None,
        false,
    ),
    acute(
        ("44465007", "Sprain of ankle (disorder)"),
        21,
        (8.0, 80.0),
        3.0,
        Setting::Clinic,
        0.0,
        (&[IBUPROFEN, NAPROXEN], 0.8),
        None,
        false,
    ),
    acute(
        ("68566005", "Urinary tract infectious disease (disorder)"),
        7,
        (15.0, 120.0),
        3.0,
        Setting::Clinic,
        0.3,
        (&[CIPROFLOXACIN], 0.9),
        None,
        false,
    ),
    acute(
        ("233604007", "Pneumonia (disorder)"),
        21,
        (0.0, 120.0),
        1.5,
        Setting::Emergency,
        0.8,
        (&[AMOX_CLAV], 1.0),
        Some(CHEST_XRAY),
        true,
    ),
    acute(
        ("283371005", "Laceration of forearm (disorder)"),
        14,
        (3.0, 90.0),
        1.5,
        Setting::Emergency,
        0.0,
        (&[ACETAMINOPHEN], 0.5),
        Some(SUTURE),
        false,
    ),
    acute(
        (
            "62106007",
            "Concussion with no loss of consciousness (disorder)",
        ),
        21,
        (3.0, 90.0),
        0.8,
        Setting::Emergency,
        0.0,
        (&[ACETAMINOPHEN], 0.7),
        None,
        false,
    ),
];

/// A CVX vaccine.
pub(crate) type Vaccine = (&'static str, &'static str);

pub(crate) const FLU: Vaccine = ("140", "Influenza, seasonal, injectable, preservative free");
pub(crate) const TD: Vaccine = ("113", "Td (adult) preservative free");
pub(crate) const TDAP: Vaccine = ("115", "Tdap");
pub(crate) const PCV13: Vaccine = ("133", "Pneumococcal conjugate PCV 13");
pub(crate) const PPSV23: Vaccine = ("33", "pneumococcal polysaccharide vaccine, 23 valent");
pub(crate) const ZOSTER: Vaccine = ("187", "zoster vaccine recombinant");
pub(crate) const COVID: Vaccine = (
    "208",
    "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
);
pub(crate) const HEP_B: Vaccine = ("08", "Hep B, adolescent or pediatric");
pub(crate) const DTAP: Vaccine = ("20", "DTaP");
pub(crate) const IPV: Vaccine = ("10", "IPV");
pub(crate) const HIB: Vaccine = ("49", "Hib (PRP-OMP)");
pub(crate) const ROTAVIRUS: Vaccine = ("119", "rotavirus, monovalent");
pub(crate) const MMR: Vaccine = ("03", "MMR");
pub(crate) const VARICELLA: Vaccine = ("21", "varicella");
pub(crate) const HEP_A: Vaccine = ("83", "Hep A, ped/adol, 2 dose");
pub(crate) const MENINGOCOCCAL: Vaccine = ("114", "meningococcal MCV4P");
pub(crate) const HPV: Vaccine = ("62", "HPV, quadrivalent");

/// Well-child visits (age in months) and the vaccines given at each.
pub(crate) const CHILD_SCHEDULE: &[(u32, &[Vaccine])] = &[
    (0, &[HEP_B]),
    (1, &[]),
    (2, &[DTAP, IPV, HIB, PCV13, ROTAVIRUS, HEP_B]),
    (4, &[DTAP, IPV, HIB, PCV13, ROTAVIRUS]),
    (6, &[DTAP, PCV13, HEP_B]),
    (9, &[]),
    (12, &[MMR, VARICELLA, HEP_A, HIB, PCV13]),
    (15, &[DTAP]),
    (18, &[HEP_A]),
    (24, &[]),
    (30, &[]),
    (36, &[]),
    (48, &[DTAP, IPV, MMR, VARICELLA]),
    (132, &[TDAP, MENINGOCOCCAL, HPV]),
];
