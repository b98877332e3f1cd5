"""Kiosk: a local enrollment and unlock station served to a browser on the device itself.

`edge-mfr kiosk --gallery PATH` (edge_mfr.cli.kiosk) starts it; docs/kiosk.md is the operator's guide.
station.py holds the logic over the SDK's FaceUnlock, app.py the HTTP API and page (needs the [kiosk]
extra: starlette and uvicorn), state.py the operator PIN hash and lockouts, liveness.py the liveness hook.
"""
