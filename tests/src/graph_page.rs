//! The agent's `/graph` page in a real browser ([`crate::browser`]): what it drew, read from the
//! DOM as a user would read the page (the services' boxes, each edge's label), and screenshots of
//! it under `target/screenshots/` (or `$MESH_SCREENSHOTS`), which `cargo xtask screenshots`
//! copies into the docs.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{agent::ADMIN, browser::Browser, SimNode};

/// What the page shows, read from its DOM.
const READ: &str = "return {
    drawn: Number(document.body.dataset.drawn),
    services: [...document.querySelectorAll('g.service')].map(s => s.dataset.service),
    nodes: [...document.querySelectorAll('g.node')].map(n => ({
        id: n.dataset.id, ejected: Number(n.dataset.ejected), text: n.textContent })),
    edges: [...document.querySelectorAll('g.label')].map(l => ({
        source: l.dataset.source, destination: l.dataset.destination, text: l.textContent })),
};";

/// The page as drawn.
#[derive(Debug, Deserialize)]
pub struct Drawn {
    /// How many times it has drawn.
    pub drawn: u64,
    pub services: Vec<String>,
    pub nodes: Vec<DrawnNode>,
    pub edges: Vec<DrawnEdge>,
}

#[derive(Debug, Deserialize)]
pub struct DrawnNode {
    /// `namespace/service/version`.
    pub id: String,
    pub ejected: u64,
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct DrawnEdge {
    pub source: String,
    pub destination: String,
    /// The label as shown: `10.0% · 5.2 rps`, then success and p99.
    pub text: String,
}

impl Drawn {
    /// The share the label of the edge from `from` to `to` shows, in percent (ids as
    /// `namespace/service/version`).
    pub fn share(&self, from: &str, to: &str) -> Option<f64> {
        self.label(from, to)?.split('%').next()?.trim().parse().ok()
    }

    /// The label of the edge from `from` to `to`, as shown.
    pub fn label(&self, from: &str, to: &str) -> Option<&str> {
        let edge = self
            .edges
            .iter()
            .find(|e| e.source == from && e.destination == to)?;
        Some(&edge.text)
    }
}

pub struct GraphPage<'n> {
    browser: Browser<'n>,
}

impl<'n> GraphPage<'n> {
    /// Opens the graph page of the agent on `node` (its admin port, [`ADMIN`]).
    pub fn open(node: &'n SimNode) -> Result<GraphPage<'n>> {
        let browser = Browser::open(node, &format!("http://{ADMIN}/graph"))?;
        Ok(GraphPage { browser })
    }

    /// What the page shows once it has drawn and `until` holds, or an error with what it
    /// showed last after `timeout`.
    pub fn drawn(&self, until: impl Fn(&Drawn) -> bool, timeout: Duration) -> Result<Drawn> {
        let value = self.browser.wait_for(
            READ,
            |value| {
                serde_json::from_value::<Drawn>(value.clone())
                    .is_ok_and(|drawn| drawn.drawn > 0 && until(&drawn))
            },
            timeout,
        )?;
        serde_json::from_value(value).context("reading the page")
    }

    /// Saves the page as `<name>.png` in the screenshots directory, and says where.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let path = screenshots_dir()?.join(format!("{name}.png"));
        self.browser.screenshot(&path)?;
        Ok(path)
    }
}

/// `$MESH_SCREENSHOTS`, else `screenshots/` in the target directory this test was built into.
pub fn screenshots_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESH_SCREENSHOTS") {
        return Ok(dir.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>: three levels up is the target directory.
    let target = exe
        .ancestors()
        .nth(3)
        .context("the test binary is not in a target directory")?;
    Ok(target.join("screenshots"))
}
