"""The web console: index.html, console.js and console.css, served by api/routers/console.py."""
