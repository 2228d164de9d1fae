"use strict";
// Log in with the page's pre-login CSRF token (double-submit: it is also in an HttpOnly cookie).
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const error = document.getElementById("error");
  error.textContent = "";
  let resp;
  try {
    resp = await fetch("/console/api/login", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify({
        name: document.getElementById("name").value,
        password: document.getElementById("password").value,
      }),
    });
  } catch (e) {
    error.textContent = "the server cannot be reached";
    return;
  }
  if (resp.ok) {
    location.href = "/console/";
    return;
  }
  let message = "login failed";
  try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
  error.textContent = message;
});
