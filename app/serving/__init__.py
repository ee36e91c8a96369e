"""The serving core: models loaded and placed, images decoded, batched, computed and answered as typed results.

No HTTP here (it never imports fastapi, starlette or app.http): the front-ends (app/http for /v1, app/v2 for the
Open Inference Protocol, app/raydata for batch jobs) call `pipeline` and turn its results into their own answers.
"""
