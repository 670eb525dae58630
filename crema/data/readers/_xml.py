"""Safe XML parsing for the XML readers (GE MUSE, HL7 aECG, Philips).

Hospital XML arrives from outside: a file may declare entities that expand exponentially (billion
laughs) or that pull in local files or URLs (external entities). ``defusedxml`` refuses both, and the
refusal becomes a :class:`RecordRejected` with a reason, never an expanded document. A DOCTYPE that
only names a DTD file (MUSE exports do: ``<!DOCTYPE RestingECG SYSTEM "restecg.dtd">``) is allowed:
expat does not fetch it.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from crema.data.signals import RecordRejected


def parse_xml(data: bytes, strip_namespaces: bool = False) -> Element:
    """The root element of `data`, or RecordRejected (`unsafe_xml` or `bad_xml`).

    `strip_namespaces`: tags become local names (``{http://...}restingecgdata`` -> ``restingecgdata``),
    for formats whose exports differ only in the namespace they declare.
    """
    try:
        root = SafeET.fromstring(data)
    except defusedxml.DefusedXmlException as err:
        raise RecordRejected("unsafe_xml", f"{type(err).__name__}: {err}") from None
    except ParseError as err:
        raise RecordRejected("bad_xml", str(err)) from None
    if strip_namespaces:
        for element in root.iter():
            element.tag = element.tag.rpartition("}")[2]
    return root


# The root element of each XML ECG format crema reads, by local name: (what the format is, the `format`
# that reads it). A file in the wrong source folder is rejected with a reason naming the format to use.
XML_FORMATS = {
    "RestingECG": ("GE MUSE XML", "muse"),
    "AnnotatedECG": ("HL7 aECG", "hl7_aecg"),
    "restingecgdata": ("Philips Sierra XML", "philips_xml"),
}


def wrong_root(root: Element, expected: str, reason: str) -> RecordRejected:
    """The rejection of a document whose root is not `expected`: naming the reader of what it is, if crema
    has one ("root element <AnnotatedECG>, expected <restingecgdata>: this is HL7 aECG: use format: hl7_aecg")."""
    found = root.tag.rpartition("}")[2]
    detail = f"root element <{found}>, expected <{expected}>"
    if found in XML_FORMATS and found != expected:
        what, fmt = XML_FORMATS[found]
        detail += f": this is {what}: use format: {fmt}"
    return RecordRejected(reason, detail)


def text(element: Element | None, path: str, default: str | None = None) -> str | None:
    """The stripped text at `path` below `element`, or `default` when absent or empty."""
    found = element.find(path) if element is not None else None
    value = (found.text or "").strip() if found is not None else ""
    return value or default


def number(element: Element | None, path: str, what: str, default: float | None = None) -> float:
    """The number at `path`; RecordRejected(`bad_header`) when missing (without default) or not a number."""
    value = text(element, path)
    if value is None:
        if default is None:
            raise RecordRejected("bad_header", f"no {what} ({path})")
        return default
    try:
        return float(value)
    except ValueError:
        raise RecordRejected("bad_header", f"{what} {value!r} is not a number") from None
