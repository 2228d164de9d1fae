"""The operators' web console: accounts and sessions (:mod:`.auth`), HTTP routes and the live
WebSocket (:mod:`.web`), the ``alarmpost server user`` command (:mod:`.users`) and the page's
static files (``static/``, shipped as package data)."""
