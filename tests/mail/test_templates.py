"""The email templates: CSS inlined for clients that drop <style>, user data escaped, and
every variable a template uses passed by the renderer.

HTML is checked by parsing it back (html.parser), as a mail client would, rather than by
matching strings: inlining re-serialises the document, so an entity may change spelling
(`&#34;` becomes `"` in text) while the text it stands for must not change.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2 import Environment, meta

from async_notifier.config import DEFAULT_TEMPLATES_DIR, SUPPORTED_LOCALES
from async_notifier.mail.render import CONTEXT_KEYS, STATUSES, Renderer
from async_notifier.messages import Notification, parse_body

LINK = "https://videos-zip.s3.amazonaws.com/k/v.zip?X-Amz-Expires=604800&X-Amz-Signature=ab"
HOSTILE_NAME = '<script>alert("name")</script> O\'Brien & Co'
HOSTILE_FILE = "<b>bold</b> &amp; \"quoted\" 'single'.mp4"
HOSTILE_ERROR = "<img src=x onerror=alert(1)> & <a href='javascript:x'>more</a>\nsecond line"
# Every tag the templates themselves write; user data must never add another.
TEMPLATE_TAGS = {
    "html", "head", "meta", "title", "body", "table", "tbody", "tr", "td",
    "h1", "p", "span", "strong", "a", "br",
}  # fmt: skip


def notification(**fields: Any) -> Notification:
    data: dict[str, Any] = {
        "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": "298ce197/298ce197.zip",
        "email": "maria@example.com",
        "name": "Maria",
        "file_name": "férias.mp4",
        "message": "ffmpeg exited with code 183",
        "locale": "pt-BR",
        "timestamp": "2025-06-19T19:46:37+00:00",
    }
    data.update(fields)
    return parse_body(json.dumps({k: v for k, v in data.items() if v is not None}))


class Parsed(HTMLParser):
    """What a client sees: elements with their attributes, and the text, entities decoded."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.chunks: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    @property
    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def render(renderer: Renderer, locale: str, status: str, *, link: bool, **fields: Any) -> Any:
    n = notification(locale=locale, status=status.upper(), **fields)
    completed = status == "completed"
    return renderer.render(
        n,
        attachment_name="férias.zip" if completed and not link else None,
        download_url=LINK if completed and link else None,
    )


CASES = [
    pytest.param(locale, status, link, name, id=f"{locale}-{status}-{kind}-{who}")
    for locale in SUPPORTED_LOCALES
    for status in STATUSES
    for link, kind in ((False, "attached"), (True, "link"))
    if not (link and status == "failed")
    for name, who in (("Maria", "named"), (None, "unnamed"))
]


@pytest.mark.parametrize(("locale", "status", "link", "name"), CASES)
def test_html_is_inlined_and_complete(
    renderer: Renderer, locale: str, status: str, link: bool, name: str | None
) -> None:
    rendered = render(renderer, locale, status, link=link, name=name)
    html = rendered.html
    lowered = html.lower()
    assert "<style" not in lowered
    assert "<link" not in lowered
    parsed = Parsed(html)
    assert parsed.tags <= TEMPLATE_TAGS
    assert ("html", {"lang": locale}) in parsed.elements
    # Every element the stylesheet targets by class now carries the rules itself: a class
    # left without a style attribute is a typo or a rule that was lost.
    classed = [(tag, attrs) for tag, attrs in parsed.elements if attrs.get("class")]
    assert len(classed) > 10
    for tag, attrs in classed:
        assert attrs.get("style"), f"<{tag} class={attrs['class']!r}> has no inline style"
    body = next(attrs for tag, attrs in parsed.elements if tag == "body")
    assert "font-family" in body["style"]
    assert ("Maria" in parsed.text) == (name is not None)
    hrefs = [attrs["href"] for tag, attrs in parsed.elements if tag == "a"]
    if link:
        assert hrefs == [LINK, LINK]  # the button and the copy-paste fallback
        assert LINK in parsed.text
    else:
        assert hrefs == []
    if status == "completed" and not link:
        assert "férias.zip" in parsed.text
    if status == "failed":
        assert "ffmpeg exited with code 183" in parsed.text


@pytest.mark.parametrize(("locale", "status", "link", "name"), CASES)
def test_text_part_is_a_text_template(
    renderer: Renderer, locale: str, status: str, link: bool, name: str | None
) -> None:
    text = render(renderer, locale, status, link=link, name=name).text
    assert "<" not in text
    assert "style" not in text
    assert "298ce197-3627-4845-83d7-cd6c98a9df8c" in text
    assert ("Maria" in text) == (name is not None)
    assert (LINK in text) == link


@pytest.mark.parametrize("status", STATUSES)
def test_subjects_are_localised(renderer: Renderer, status: str) -> None:
    subjects = {
        locale: render(renderer, locale, status, link=False).subject for locale in SUPPORTED_LOCALES
    }
    assert len(set(subjects.values())) == len(SUPPORTED_LOCALES)
    for subject in subjects.values():
        assert "férias.mp4" in subject
        assert "\n" not in subject


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
@pytest.mark.parametrize(
    ("status", "link"), [("completed", False), ("completed", True), ("failed", False)]
)
def test_hostile_user_data_stays_text_after_inlining(
    renderer: Renderer, locale: str, status: str, link: bool
) -> None:
    rendered = render(
        renderer,
        locale,
        status,
        link=link,
        name=HOSTILE_NAME,
        file_name=HOSTILE_FILE,
        message=HOSTILE_ERROR,
    )
    html = rendered.html
    parsed = Parsed(html)
    # Nothing the user wrote became markup ...
    assert parsed.tags <= TEMPLATE_TAGS
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>" not in html
    assert not any("javascript:" in attrs.get("href", "") for _, attrs in parsed.elements)
    assert not any(
        name.startswith("on") for _, attrs in parsed.elements for name in attrs
    )  # no onerror= and the like
    # ... and it reads exactly as written: inlining decoded no entity one level too far.
    assert HOSTILE_NAME in parsed.text
    assert HOSTILE_FILE in parsed.text
    assert "&amp;amp;" in html  # the user's literal "&amp;", escaped once
    if status == "failed":
        first, second = HOSTILE_ERROR.split("\n")
        assert first in parsed.text
        assert second in parsed.text
        assert html.count("<br>") >= 1  # its line break, as markup of the template's own
    # The text part and the subject are not HTML: the values appear as written.
    assert HOSTILE_NAME in rendered.text
    assert "&lt;" not in rendered.text
    assert HOSTILE_FILE in rendered.subject


def test_link_with_query_and_quotes_round_trips_through_the_href(renderer: Renderer) -> None:
    url = 'https://example.com/f.zip?a=1&b="2"&c=<3>'
    n = notification(locale="en")
    parsed = Parsed(renderer.render(n, download_url=url).html)
    assert [attrs["href"] for tag, attrs in parsed.elements if tag == "a"] == [url, url]


# --------------------------------------------------------------------------- variables


def undeclared_variables(env: Environment) -> dict[str, set[str]]:
    """Per template, the variables it reads that the renderer does not pass."""
    assert env.loader is not None
    known = CONTEXT_KEYS | set(env.globals)
    problems: dict[str, set[str]] = {}
    for name in env.list_templates(filter_func=lambda n: n.endswith((".html", ".txt"))):
        source, _, _ = env.loader.get_source(env, name)
        unknown = meta.find_undeclared_variables(env.parse(source)) - known
        if unknown:
            problems[name] = unknown
    return problems


def test_every_template_variable_is_passed_by_the_renderer(renderer: Renderer) -> None:
    env = renderer.environment
    names = env.list_templates()
    assert "base.html" in names
    for locale in SUPPORTED_LOCALES:
        for status in STATUSES:
            for part in ("subject.txt", "txt", "html"):
                assert f"{locale}/{status}.{part}" in names
    assert undeclared_variables(env) == {}


def test_a_template_using_an_unknown_variable_is_caught(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    page = templates / "en" / "failed.html"
    page.write_text(
        page.read_text().replace("{% endblock %}", "{{ support_email }}{% endblock %}", 1)
    )
    subject = templates / "pt-BR" / "completed.subject.txt"
    subject.write_text(subject.read_text() + " {{ brand }}")
    renderer = Renderer(templates)
    assert undeclared_variables(renderer.environment) == {
        "en/failed.html": {"support_email"},
        "pt-BR/completed.subject.txt": {"brand"},
    }
    with pytest.raises(jinja2.UndefinedError, match="support_email"):
        renderer.render(notification(locale="en", status="FAILED"))


def test_renderer_passes_exactly_context_keys(
    renderer: Renderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONTEXT_KEYS is what the test above trusts; check it is what render() really passes."""
    seen: list[set[str]] = []
    original = jinja2.Template.render

    def spy(self: jinja2.Template, *args: Any, **kwargs: Any) -> str:
        seen.append(set(dict(*args, **kwargs)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.Template, "render", spy)
    renderer.render(notification(), attachment_name="férias.zip")
    renderer.render(notification(status="FAILED", locale="en"))
    assert len(seen) == 6
    assert all(keys == CONTEXT_KEYS for keys in seen)


# --------------------------------------------------------------------------- inlining


def test_linked_stylesheets_are_dropped_never_fetched(tmp_path: Path) -> None:
    """A template may not make the worker reach the network: <link> and @import are ignored."""
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES_DIR, templates)
    base = templates / "base.html"
    base.write_text(
        base.read_text().replace(
            "<style>",
            '<link rel="stylesheet" href="http://127.0.0.1:9/remote.css">\n'
            '<link rel="stylesheet" href="local.css">\n'
            '<style>\n  @import url("http://127.0.0.1:9/imported.css");\n'
            "  @media (max-width: 600px) { .title { font-size: 20px; } }\n",
            1,
        )
    )
    html = Renderer(templates).render(notification(locale="en"), attachment_name="x.zip").html
    assert "<link" not in html
    assert "<style" not in html
    assert "@import" not in html
    assert "@media" not in html
    assert "font-size: 24px" in html  # the .title rule itself still inlined
