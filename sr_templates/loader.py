"""Loading and checking the per-analyzer SR templates (``sr_templates/<analyzer>.yaml``).

A template says which coded concept, value set and unit stand for each key an
analyzer's :class:`~dicomnode.analysis.Outputs` declares; the encoders read codes
only from here. The file schema is described in ``sr_templates/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

if TYPE_CHECKING:  # pragma: no cover
    from dicomnode.analysis import Outputs

TEMPLATE_DIR = Path(__file__).resolve().parent
PRIVATE_SCHEME = "99DICOMNODE"

# Concepts the encoders themselves need that DICOM's tables lack (prefix DN-GEN-).
# They take part in the duplicate check, so no template can reuse these values with another meaning.
GENERIC_CODES: dict[str, CodedConcept] = {
    "not_evaluated": CodedConcept("DN-GEN-0001", PRIVATE_SCHEME, "Not evaluated by this model"),
    "review_required": CodedConcept("DN-GEN-0002", PRIVATE_SCHEME, "Review by a radiologist required"),
    "review_reason": CodedConcept("DN-GEN-0003", PRIVATE_SCHEME, "Reason for review"),
    "not_for_clinical_use": CodedConcept("DN-GEN-0004", PRIVATE_SCHEME, "Not for clinical use"),
    "uncertainty_class": CodedConcept("DN-GEN-0005", PRIVATE_SCHEME, "Uncertainty class"),
    "certain": CodedConcept("DN-GEN-0006", PRIVATE_SCHEME, "Certain"),
    "moderately_uncertain": CodedConcept("DN-GEN-0007", PRIVATE_SCHEME, "Moderately uncertain"),
    "highly_uncertain": CodedConcept("DN-GEN-0008", PRIVATE_SCHEME, "Highly uncertain"),
    "model_uncertainty": CodedConcept("DN-GEN-0009", PRIVATE_SCHEME, "Model uncertainty"),
    "analysed_image": CodedConcept("DN-GEN-0010", PRIVATE_SCHEME, "Analysed image"),
    "measurement_flag": CodedConcept("DN-GEN-0011", PRIVATE_SCHEME, "Measurement qualifier"),
    "ai_procedure": CodedConcept("DN-GEN-0012", PRIVATE_SCHEME, "AI image analysis"),
    "position_uncertainty": CodedConcept("DN-GEN-0013", PRIVATE_SCHEME, "Position uncertainty (SD)"),
}

_KINDS = ("findings", "measurements", "regions", "segments", "sites")


class TemplateError(ValueError):
    """A template is missing, malformed, or does not match its analyzer's outputs."""


@dataclass(frozen=True)
class FindingSpec:
    concept: CodedConcept
    values: str | dict[str, CodedConcept]
    """``"boolean"`` or category key -> coded value."""
    evaluated: bool = True

    @property
    def is_boolean(self) -> bool:
        return self.values == "boolean"


@dataclass(frozen=True)
class MeasurementSpec:
    concept: CodedConcept
    unit: str
    # Another measurement key: written under that measurement of the same group (HAS PROPERTIES),
    # e.g. a translation in % under the translation in mm, so viewers give it no label line of its own.
    property_of: str | None = None

    @property
    def unit_code(self) -> CodedConcept:
        return ucum(self.unit)


@dataclass(frozen=True)
class SiteSpec:
    concept: CodedConcept
    laterality: CodedConcept | None = None


@dataclass(frozen=True)
class RegionSpec:
    label: str


@dataclass(frozen=True)
class SegmentSpec:
    label: str
    category: CodedConcept
    type: CodedConcept
    laterality: CodedConcept | None = None


@dataclass
class Template:
    """One analyzer's coded vocabulary, as loaded from its YAML file."""

    analyzer: str
    title: CodedConcept
    procedure: CodedConcept
    series_description: str
    findings: dict[str, FindingSpec] = field(default_factory=dict)
    measurements: dict[str, MeasurementSpec] = field(default_factory=dict)
    sites: dict[str, SiteSpec] = field(default_factory=dict)
    regions: dict[str, RegionSpec] = field(default_factory=dict)
    segments: dict[str, SegmentSpec] = field(default_factory=dict)
    # Finding and measurement keys the report's one-line summary names first, in this order.
    key_findings: list[str] = field(default_factory=list)
    path: Path | None = None

    def where(self, kind: str, key: str) -> str:
        return f"{kind}.{key} in {self.path or self.analyzer + '.yaml'}"

    def private_codes(self) -> list[tuple[CodedConcept, str]]:
        """Every private code in the template with where it appears."""
        found: list[tuple[CodedConcept, str]] = []

        def add(code: CodedConcept | None, where: str) -> None:
            if code is not None and code.scheme_designator == PRIVATE_SCHEME:
                found.append((code, where))

        add(self.title, "title")
        add(self.procedure, "procedure")
        for key, f in self.findings.items():
            add(f.concept, f"findings.{key}")
            if isinstance(f.values, dict):
                for v, code in f.values.items():
                    add(code, f"findings.{key}.values.{v}")
        for key, m in self.measurements.items():
            add(m.concept, f"measurements.{key}")
        for key, s in self.sites.items():
            add(s.concept, f"sites.{key}")
            add(s.laterality, f"sites.{key}.laterality")
        for key, g in self.segments.items():
            add(g.category, f"segments.{key}.category")
            add(g.type, f"segments.{key}.type")
            add(g.laterality, f"segments.{key}.laterality")
        return found


# ---------------------------------------------------------------------------
# Codes and units
# ---------------------------------------------------------------------------


def parse_code(value: Any, where: str) -> CodedConcept:
    """A code from ``SCHEME.Name`` (pydicom's tables) or ``{scheme, value, meaning}``."""
    if isinstance(value, str):
        scheme, _, name = value.partition(".")
        if not name:
            raise TemplateError(f"{where}: code {value!r} must be written SCHEME.Name (e.g. SCT.Lung) or as {{scheme, value, meaning}}")
        try:
            code = getattr(getattr(codes, scheme), name)
        except AttributeError:
            raise TemplateError(f"{where}: {value!r} is not a name in pydicom.sr.codedict.codes; declare a private code inline instead") from None
        return CodedConcept(code.value, code.scheme_designator, code.meaning, code.scheme_version)
    if isinstance(value, Mapping):
        missing = [k for k in ("scheme", "value", "meaning") if not value.get(k)]
        if missing:
            raise TemplateError(f"{where}: inline code lacks {', '.join(missing)}")
        if str(value["scheme"]) != PRIVATE_SCHEME:
            raise TemplateError(
                f"{where}: inline codes must use the private scheme {PRIVATE_SCHEME}; "
                f"write codes of {value['scheme']} by their name in pydicom.sr.codedict.codes"
            )
        return CodedConcept(str(value["value"]), PRIVATE_SCHEME, str(value["meaning"]))
    raise TemplateError(f"{where}: expected a code, got {type(value).__name__}")


def _ucum_table() -> dict[str, CodedConcept]:
    table: dict[str, CodedConcept] = {}
    for name in codes.UCUM.dir():
        code = getattr(codes.UCUM, name)
        table.setdefault(code.value, CodedConcept(code.value, "UCUM", code.meaning))
    return table


_UCUM = _ucum_table()


def ucum(unit: str) -> CodedConcept:
    """The UCUM coded unit for a unit string such as ``mm``, ``deg`` or ``1``."""
    if not unit:
        raise TemplateError("a measurement unit must be a UCUM code string such as 'mm', 'deg' or '1'")
    return _UCUM.get(unit) or CodedConcept(unit, "UCUM", unit)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def template_path(analyzer_name: str, directory: Path | None = None) -> Path:
    return Path(directory or TEMPLATE_DIR) / f"{analyzer_name}.yaml"


def load_template(analyzer_name: str, directory: Path | None = None) -> Template:
    """Read ``sr_templates/<analyzer_name>.yaml`` (or the same name in ``directory``).

    Raises
    ------
    TemplateError
        When the file is missing or malformed; the message names the key and file.
    """
    path = template_path(analyzer_name, directory)
    if not path.is_file():
        raise TemplateError(f"analyzer {analyzer_name!r} has no SR template; write {path} (schema in sr_templates/README.md)")
    template = load_template_file(path)
    if template.analyzer != analyzer_name:
        raise TemplateError(f"analyzer in {path} is {template.analyzer!r}; it must equal the file name {analyzer_name!r}")
    return template


def load_template_file(path: Path) -> Template:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(f"SR template {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise TemplateError(f"SR template {path} must be a mapping at top level")

    def at(key: str) -> str:
        return f"{key} in {path}"

    for key in ("analyzer", "procedure", "series_description"):
        if key not in data:
            raise TemplateError(f"{at(key)}: required key is missing")
    template = Template(
        analyzer=str(data["analyzer"]),
        title=parse_code(data.get("title", "DCM.ImagingMeasurementReport"), at("title")),
        procedure=parse_code(data["procedure"], at("procedure")),
        series_description=str(data["series_description"]),
        path=path,
    )
    unknown = set(data) - {"analyzer", "title", "procedure", "series_description", "key_findings", *_KINDS}
    if unknown:
        raise TemplateError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
    key_findings = data.get("key_findings") or []
    if not isinstance(key_findings, list):
        raise TemplateError(f"{at('key_findings')}: must be a list of finding or measurement keys")
    template.key_findings = [str(k) for k in key_findings]
    for key, spec in _section(data, "findings", path).items():
        values = spec.get("values", "boolean")
        if values == "boolean":
            parsed: str | dict[str, CodedConcept] = "boolean"
        elif isinstance(values, dict) and values:
            parsed = {str(k): parse_code(v, at(f"findings.{key}.values.{k}")) for k, v in values.items()}
        else:
            raise TemplateError(f"{at(f'findings.{key}.values')}: must be 'boolean' or a mapping of category keys to codes")
        template.findings[key] = FindingSpec(
            concept=parse_code(_need(spec, "concept", at(f"findings.{key}")), at(f"findings.{key}.concept")),
            values=parsed,
            evaluated=bool(spec.get("evaluated", True)),
        )
    for key, spec in _section(data, "measurements", path).items():
        unit = _need(spec, "unit", at(f"measurements.{key}"))
        template.measurements[key] = MeasurementSpec(
            concept=parse_code(_need(spec, "concept", at(f"measurements.{key}")), at(f"measurements.{key}.concept")),
            unit=str(unit),
            property_of=str(spec["property_of"]) if spec.get("property_of") else None,
        )
    for key, m in template.measurements.items():
        target = template.measurements.get(m.property_of) if m.property_of else None
        if m.property_of and (target is None or target.property_of):
            raise TemplateError(f"{at(f'measurements.{key}.property_of')}: {m.property_of!r} must be another measurement "
                                "of this template that is not itself a property_of one")
    for key in template.key_findings:
        if key not in template.findings and key not in template.measurements:
            raise TemplateError(f"{at('key_findings')}: {key!r} is neither a finding nor a measurement of this template")
    for key, spec in _section(data, "sites", path).items():
        template.sites[key] = SiteSpec(
            concept=parse_code(_need(spec, "concept", at(f"sites.{key}")), at(f"sites.{key}.concept")),
            laterality=parse_code(spec["laterality"], at(f"sites.{key}.laterality")) if spec.get("laterality") else None,
        )
    for key, spec in _section(data, "regions", path).items():
        template.regions[key] = RegionSpec(label=str(spec.get("label") or key))
    for key, spec in _section(data, "segments", path).items():
        w = at(f"segments.{key}")
        template.segments[key] = SegmentSpec(
            label=str(spec.get("label") or key),
            category=parse_code(_need(spec, "category", w), f"{w}.category"),
            type=parse_code(_need(spec, "type", w), f"{w}.type"),
            laterality=parse_code(spec["laterality"], f"{w}.laterality") if spec.get("laterality") else None,
        )
    return template


def _section(data: dict[str, Any], kind: str, path: Path) -> dict[str, dict[str, Any]]:
    section = data.get(kind) or {}
    if not isinstance(section, dict):
        raise TemplateError(f"{kind} in {path}: must be a mapping of keys to entries")
    out: dict[str, dict[str, Any]] = {}
    for key, spec in section.items():
        if not isinstance(spec, dict):
            raise TemplateError(f"{kind}.{key} in {path}: must be a mapping")
        out[str(key)] = spec
    return out


def _need(spec: dict[str, Any], key: str, where: str) -> Any:
    if key not in spec or spec[key] in (None, ""):
        raise TemplateError(f"{where}: '{key}' is missing")
    return spec[key]


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------


def validate_template(template: Template, outputs: "Outputs") -> None:
    """Check that the template covers exactly the analyzer's declared outputs.

    Raises
    ------
    TemplateError
        Naming the first missing, extra or wrong entry and the file.
    """
    declared: dict[str, Iterable[str]] = {
        "findings": outputs.findings,
        "measurements": outputs.measurements,
        "regions": outputs.regions,
        "segments": outputs.segments,
        "sites": outputs.sites,
    }
    for kind, keys in declared.items():
        have = set(getattr(template, kind))
        want = set(keys)
        for key in sorted(want - have):
            raise TemplateError(f"{template.where(kind, key)}: missing; the analyzer declares it in Outputs.{kind}")
        for key in sorted(have - want):
            raise TemplateError(f"{template.where(kind, key)}: not declared in the analyzer's Outputs.{kind}; remove it or declare it")
    for key, declared_values in outputs.findings.items():
        spec = template.findings[key]
        if declared_values == "boolean":
            if not spec.is_boolean:
                raise TemplateError(f"{template.where('findings', key)}: the analyzer reports a boolean; values must be 'boolean'")
        else:
            if spec.is_boolean:
                raise TemplateError(f"{template.where('findings', key)}: the analyzer reports categories {list(declared_values)}; values must map each")
            missing = [v for v in declared_values if v not in spec.values]
            extra = [v for v in spec.values if v not in declared_values]
            if missing or extra:
                raise TemplateError(
                    f"{template.where('findings', key)}: value set {sorted(spec.values)} does not match the analyzer's "
                    f"categories {list(declared_values)}"
                )
    for key, unit in outputs.measurements.items():
        if template.measurements[key].unit != unit:
            raise TemplateError(
                f"{template.where('measurements', key)}: unit {template.measurements[key].unit!r} differs from the analyzer's {unit!r}"
            )


def check_private_codes(templates: Iterable[Template]) -> None:
    """Refuse a private code value used with two different meanings anywhere."""
    seen: dict[str, tuple[str, str]] = {c.value: (c.meaning, "the encoders' generic codes") for c in GENERIC_CODES.values()}
    for template in templates:
        for code, where in template.private_codes():
            where_full = f"{where} in {template.path or template.analyzer}"
            if code.value in seen and seen[code.value][0] != code.meaning:
                meaning, first = seen[code.value]
                raise TemplateError(
                    f"{where_full}: private code {code.value} means {code.meaning!r} here but {meaning!r} in {first}; "
                    "give one of them a new code value"
                )
            seen.setdefault(code.value, (code.meaning, where_full))


def check_all(directory: Path | None = None, analyzers: Iterable[str] | None = None) -> dict[str, Template]:
    """Load and validate the template of every installed analyzer (node start-up).

    Every ``*.yaml`` in the directory takes part in the private-code check,
    whether or not its analyzer is installed.

    Raises
    ------
    TemplateError
        On the first template that is missing, malformed or does not match.
    """
    from dicomnode.registry import analyzer_class, available_analyzers

    directory = Path(directory or TEMPLATE_DIR)
    names = list(analyzers) if analyzers is not None else available_analyzers()
    loaded: dict[str, Template] = {}
    for name in names:
        try:
            cls = analyzer_class(name)
        except (ImportError, AttributeError, KeyError, TypeError) as exc:
            raise TemplateError(f"analyzer {name!r} cannot be loaded, so its template cannot be checked: {exc}") from exc
        template = load_template(name, directory)
        validate_template(template, cls.outputs)
        loaded[name] = template
    others = [load_template_file(p) for p in sorted(directory.glob("*.yaml")) if p.stem not in loaded]
    check_private_codes([*loaded.values(), *others])
    return loaded
