"""The demo page: GET / and its static files (app/static: no CDN, no build step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC = Path(__file__).resolve().parents[2] / "static"  # app/static


class RevalidatedStaticFiles(StaticFiles):
    """The web page's files, revalidated (ETag) on every load, so an upgrade never leaves a page half stale."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """The page, when its files are there (a wheel always has them)."""
    if (STATIC / "index.html").exists():
        app.mount("/static", RevalidatedStaticFiles(directory=STATIC), name="static")
        app.include_router(router)
