"""The licences of the Unsloth code swft-lite would run, read from each installed file's own header.

Package metadata is not the whole story: unsloth 2026.10.9 says Apache-2.0 and unsloth_zoo LGPL-3.0, while 101 of
the 179 Python files of `unsloth/` (kernels/moe, fsdp2, ddp defaults) and 114 of the 257 of `unsloth_zoo/`
(gpt_oss_grouped_qlora.py among them, on by default for gpt-oss) carry AGPL-3.0 headers. What a file says at its
top is what binds whoever redistributes it or serves a product built on it, so `swft-lite detect` counts the
headers of the installed files. Nothing is imported: the package folder is found with importlib's finder only
(importing Unsloth patches torch/transformers and needs a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("unsloth", "unsloth_zoo")
HEADER_CHARS = 3000  # licence headers sit in the first lines; a docstring further down is not a header

# The first of these found in a file's header names its licence. Order matters: the LGPL header says "GNU General
# Public License for more details" and the AGPL one "GNU Affero General Public License", so the specific ones first.
_MARKERS = (
    ("AGPL-3.0", ("GNU Affero General Public License", "AGPL-3.0", "AGPL v3", "AGPLv3")),
    ("LGPL-3.0", ("GNU Lesser General Public License", "LGPL-3.0", "LGPLv3")),
    ("GPL-3.0", ("GNU General Public License", "GPL-3.0")),
    ("Apache-2.0", ("Apache License, Version 2.0", "Apache-2.0", "Apache License 2.0")),
    ("MIT", ("MIT License", "Permission is hereby granted, free of charge")),
    ("BSD", ("BSD License", "BSD-3-Clause", "Redistribution and use in source and binary forms")),
)


# Some files under another header license parts of themselves apart, in a comment inside the code: "# This Unsloth
# Zoo code section is licensed under AGPL3" (unsloth_zoo temporary_patches/gpt_oss.py, whose header is LGPL-3.0).
_AGPL_SECTION = re.compile(r"licen[cs]ed under (?:the )?(?:GNU )?AGPL", re.IGNORECASE)


def has_agpl_section(text: str) -> bool:
    """Whether a file marks some of its code as AGPL-3.0 in a comment (whatever its header says)."""
    return bool(_AGPL_SECTION.search(text))


def header_licence(text: str) -> str:
    """The licence a file's header names ("none" when it names none)."""
    head = text[:HEADER_CHARS]
    for name, markers in _MARKERS:
        if any(m in head for m in markers):
            return name
    return "none"


@dataclass
class PackageLicences:
    package: str
    installed: bool
    version: str | None = None
    metadata_licence: str | None = None
    folder: str | None = None
    files: int = 0
    by_licence: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # licence -> first few files (relative paths)
    agpl_sections: list[str] = field(default_factory=list)  # files under another header with AGPL-3.0 sections

    @property
    def agpl_files(self) -> int:
        """Files with AGPL-3.0 code: by header, or by a section notice inside."""
        return self.by_licence.get("AGPL-3.0", 0) + len(self.agpl_sections)

    def to_dict(self) -> dict:
        return {**self.__dict__, "agpl_files": self.agpl_files}

    def summary(self) -> str:
        if not self.installed:
            return f"{self.package}: not installed (nothing of it would run)"
        counts = ", ".join(f"{lic} {n}" for lic, n in sorted(self.by_licence.items(), key=lambda kv: -kv[1]))
        meta = f"; package metadata says {self.metadata_licence}" if self.metadata_licence else ""
        line = f"{self.package} {self.version or ''}: {self.files} Python files by header: {counts}{meta}".replace(
            "  ", " ")
        if self.agpl_files:
            line += (f". AGPL-3.0 code in {self.agpl_files} of them: {self.by_licence.get('AGPL-3.0', 0)} by header"
                     f" (e.g. {', '.join(self.examples.get('AGPL-3.0', []))})")
            if self.agpl_sections:
                line += (f", {len(self.agpl_sections)} in sections marked inside files under another header "
                         f"({', '.join(self.agpl_sections[:3])})")
        return line


def scan_folder(folder: Path, package: str = "") -> PackageLicences:
    """Every .py file under `folder`, counted by the licence its header names."""
    res = PackageLicences(package=package or folder.name, installed=True, folder=str(folder))
    for path in sorted(folder.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        lic = header_licence(text)
        if lic != "AGPL-3.0" and has_agpl_section(text):
            res.agpl_sections.append(str(path.relative_to(folder)))
        res.files += 1
        res.by_licence[lic] = res.by_licence.get(lic, 0) + 1
        ex = res.examples.setdefault(lic, [])
        if len(ex) < 3:
            ex.append(str(path.relative_to(folder)))
    return res


def _metadata_licence(dist: str) -> str | None:
    from importlib import metadata

    try:
        md = metadata.metadata(dist)
    except metadata.PackageNotFoundError:
        return None
    expr = md.get("License-Expression") or md.get("License")
    if expr and len(expr) < 80:
        return expr
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    return ", ".join(classifiers) or None


def scan_package(package: str) -> PackageLicences:
    """The installed package's files by header licence, with its version and metadata licence; installed=False
    when it is not installed."""
    import importlib.util
    from importlib import metadata

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return PackageLicences(package=package, installed=False)
    folder = Path(list(spec.submodule_search_locations)[0])
    res = scan_folder(folder, package)
    try:
        res.version = metadata.version(package)
    except metadata.PackageNotFoundError:
        res.version = None
    res.metadata_licence = _metadata_licence(package)
    return res


def scan_unsloth() -> list[PackageLicences]:
    return [scan_package(p) for p in PACKAGES]
