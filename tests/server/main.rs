//! The black-box tests, in one binary: a real server on `127.0.0.1:0`, real HTTP, WebSocket and
//! Socket.IO clients, and a test model server. The realtime scenarios are written once and run
//! over every transport (`realtime`, `replies`); what only one transport does has its own module.

#[path = "../support/mod.rs"]
mod support;

mod accounts;
mod actors;
mod auth;
mod browser;
mod cluster;
mod cluster_rates;
mod durability;
mod edge;
mod hardening;
mod hostile;
mod jwks;
mod models;
mod openapi;
mod realtime;
mod replies;
mod rest;
mod shutdown;
mod slow_clients;
mod socketio;
mod websocket;
