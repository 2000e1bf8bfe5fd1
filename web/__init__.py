"""PromptPics on the web: the gallery, the job pages, the live queue, the stats charts and the
Prometheus metrics, on Starlette (docs/WEB.md). Importing this package loads nothing heavy: the
bot imports ``web.links`` to sign ``/gallery`` links without the server.

    app.py        build_app: routes, sessions, error pages
    state.py      WebState: what every handler reads (history, engine, settings, key, templates)
    settings.py   [web] of config.toml and PROMPTPICS_WEB_TOKEN
    access.py     who is looking: admin (session or bearer) or a member's link; CSRF
    links.py      members' signed, expiring gallery links and their key (standard library only)
    pages.py      gallery, job page, image and thumbnail, login
    dashboard.py  live queue (SSE), actions, stats charts, and the /metrics route
    metrics.py    the Prometheus collector
    charts.py     server-side SVG charts
    present.py    how a job reads on a page (the /imagine that remakes it, times, verdicts)
    thumbs.py     thumbnails, cached beside each PNG
    server.py     uvicorn inside our loop, without its signal handlers
"""
