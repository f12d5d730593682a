"""Render the localised subject, text and HTML of an email with Jinja2.

Templates are compiled once per process; HTML is autoescaped and undefined
variables are errors, so a template typo fails a test, not a customer's email.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.exceptions import TemplateError

from .config import SUPPORTED_LOCALES
from .errors import ConfigError
from .messages import Notification

PARTS = ("subject.txt", "txt", "html")
_DATE_FORMATS = {"pt-BR": "%d/%m/%Y %H:%M", "en": "%b %d, %Y %H:%M"}


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
        self._templates: dict[tuple[str, str, str], Template] = {}
        try:
            for locale in locales:
                for status in ("completed", "failed"):
                    for part in PARTS:
                        name = f"{locale}/{status}.{part}"
                        self._templates[(locale, status, part)] = self._env.get_template(name)
        except TemplateError as exc:
            raise ConfigError(f"cannot load template from {templates_dir}: {exc}") from exc

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
        context = {
            "name": notification.name,
            "display_name": notification.display_name,
            "video_id": notification.video_id,
            "status": notification.status,
            "attachment_name": attachment_name,
            "download_url": download_url,
            "link_expires_at": _format_time(link_expires_at, locale),
            "error_message": notification.message if notification.status == "FAILED" else "",
            "finished_at": _format_time(notification.timestamp, locale),
        }
        subject = self._templates[(locale, status, "subject.txt")].render(context)
        return RenderedEmail(
            # One line whatever the template does: a subject is a header.
            subject=" ".join(subject.split()),
            text=self._templates[(locale, status, "txt")].render(context),
            html=self._templates[(locale, status, "html")].render(context),
            locale=locale,
        )


def _format_time(value: datetime | None, locale: str) -> str | None:
    if value is None:
        return None
    text = value.strftime(_DATE_FORMATS.get(locale, "%Y-%m-%d %H:%M"))
    return f"{text} {value.tzname()}" if value.tzinfo is not None else text
