"""The web app's tabs, one module each (Gradio components and wiring only; the work is in
dpt_lab.session). app.py lists them in TABS and builds them with ui.base.Context; see
CONTRIBUTING.md for adding one."""
