"""Render the localised subject, text and HTML of an email with Jinja2.

Templates are compiled once per process; HTML is autoescaped and undefined
variables are errors, so a template typo fails a test, not a customer's email.
The HTML templates keep their CSS in one `<style>` block (easy to edit); the
rendered HTML has it inlined into `style=` attributes, because Gmail and
Outlook drop or mangle `<style>` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypedDict

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.exceptions import TemplateError

from ..config import SUPPORTED_LOCALES, ConfigError
from ..messages import Notification

PARTS = ("subject.txt", "txt", "html")
STATUSES = ("completed", "failed")
_DATE_FORMATS = {"pt-BR": "%d/%m/%Y %H:%M", "en": "%b %d, %Y %H:%M"}


class TemplateContext(TypedDict):
    """Every variable a template may use, all of them always passed.

    mypy holds `Renderer.render` to exactly these keys, and the template test holds
    the templates to them, so neither side can drift from the other.
    """

    locale: str
    status: str
    video_id: str
    name: str | None
    display_name: str
    attachment_name: str | None
    download_url: str | None
    link_expires_at: str | None
    error_message: str
    finished_at: str | None


CONTEXT_KEYS: frozenset[str] = frozenset(TemplateContext.__required_keys__)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str
    locale: str


class Renderer:
    def __init__(
        self,
        templates_dir: Path,
        default_locale: str = "pt-BR",
        locales: tuple[str, ...] = SUPPORTED_LOCALES,
    ) -> None:
        self.default_locale = default_locale
        self._env = Environment(
            loader=FileSystemLoader(str(templates_dir)),
            autoescape=select_autoescape(["html"], default_for_string=False, default=False),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        # One inliner per process: it is only configuration, and cheap to reuse. Nothing
        # is fetched (no <link> or @import is ever loaded, so a template cannot make the
        # worker reach the network), and <style>/<link> tags are dropped once inlined.
        self._inliner = css_inline.CSSInliner(
            inline_style_tags=True,
            keep_style_tags=False,
            keep_link_tags=False,
            keep_at_rules=False,
            load_remote_stylesheets=False,
        )
        self._templates: dict[tuple[str, str, str], Template] = {}
        try:
            for locale in locales:
                for status in STATUSES:
                    for part in PARTS:
                        name = f"{locale}/{status}.{part}"
                        self._templates[(locale, status, part)] = self._env.get_template(name)
        except TemplateError as exc:
            raise ConfigError(f"cannot load template from {templates_dir}: {exc}") from exc

    @property
    def environment(self) -> Environment:
        """The Jinja2 environment (loader included), for tools that inspect the templates."""
        return self._env

    def render(
        self,
        notification: Notification,
        *,
        attachment_name: str | None = None,
        download_url: str | None = None,
        link_expires_at: datetime | None = None,
    ) -> RenderedEmail:
        locale = notification.locale or self.default_locale
        if (locale, "completed", "txt") not in self._templates:
            locale = self.default_locale
        status = notification.status.lower()
        context: TemplateContext = {
            "locale": locale,
            "status": notification.status,
            "video_id": notification.video_id,
            "name": notification.name,
            "display_name": notification.display_name,
            "attachment_name": attachment_name,
            "download_url": download_url,
            "link_expires_at": _format_time(link_expires_at, locale),
            "error_message": notification.message if notification.status == "FAILED" else "",
            "finished_at": _format_time(notification.timestamp, locale),
        }
        subject = self._templates[(locale, status, "subject.txt")].render(context)
        html = self._templates[(locale, status, "html")].render(context)
        return RenderedEmail(
            # One line whatever the template does: a subject is a header.
            subject=" ".join(subject.split()),
            text=self._templates[(locale, status, "txt")].render(context),
            # Inlining parses and re-serialises the autoescaped HTML: text stays text
            # (`&lt;` stays `&lt;`), though an entity may change spelling (`&#34;` -> `"`).
            # It drops the final newline; put it back, as the MIME part will have one.
            html=self._inliner.inline(html).rstrip("\n") + "\n",
            locale=locale,
        )


def _format_time(value: datetime | None, locale: str) -> str | None:
    if value is None:
        return None
    text = value.strftime(_DATE_FORMATS.get(locale, "%Y-%m-%d %H:%M"))
    return f"{text} {value.tzname()}" if value.tzinfo is not None else text
