//! quicmesh-node: the per-host daemon. Config -> control session -> node state snapshot ->
//! data plane (tunnels, L4 proxy, overlay), with local admin and metrics apart.
//!
//! # Layers
//!
//! A module may use the modules of its own layer and the layers before it, never one
//! after it (checked by the `layers` test below):
//!
//! 1. `protocol` (its own crate: pure, no IO).
//! 2. Leaves: [`view`] (the applied snapshot), [`reason`] (every refusal, drop and close
//!    reason as a typed label), [`authz`] (the one authorization core: every allow/deny is
//!    a call into it), [`clock`], [`config`], [`store`], [`frame`], [`traffic`].
//! 3. [`metrics`], [`tls`]; [`registry`] (the tunnel registry, only writer of the tunnel
//!    tables, publishing tunnel up/down events).
//! 4. [`flow`], [`path`] (the path layer: socket, route tables, probes).
//! 5. [`state`]: `Node`, the wiring the shells share.
//! 6. Shells: [`tunnel`], [`proxy`], [`overlay`], [`dns`], [`health`], [`control`],
//!    [`admin`], then [`run`], which starts them.
//!
//! Where this is going (not yet true): the shells take the leaves they need instead of
//! the whole `Node`, so that `Node` is only wiring in `run`.

pub mod admin;
pub mod authz;
pub mod clock;
pub mod config;
pub mod control;
pub mod dns;
pub mod flow;
pub mod frame;
pub mod gateway;
pub mod health;
pub mod l7;
pub mod local_http;
pub mod metrics;
pub mod overlay;
pub mod path;
pub mod proxy;
pub mod reason;
pub mod registry;
pub mod run;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod tunnel;
pub mod view;
pub mod wg;

#[cfg(test)]
mod layers {
    //! The layer order in the crate docs, enforced on the source text: a module's
    //! `crate::x` references (and `crate::{x, y}` lists) may only name modules of its
    //! layer or earlier ones. The shells are ordered too, so they form no cycle.

    const LAYERS: &[&[&str]] = &[
        &[
            "view",
            "reason",
            "authz",
            "clock",
            "config",
            "store",
            "frame",
            "traffic",
            "local_http",
            "wg",
        ],
        &["metrics", "tls", "registry", "telemetry"],
        &["flow", "path"],
        &["state"],
        // `l7` is the HTTP ingress (and what it shares with the egress), which tunnel
        // ingress hands `http` services' streams to.
        &["tunnel", "l7"],
        // `path_manager` is path/manager.rs: a shell inside the path module.
        &[
            "proxy",
            "l7_egress",
            "overlay",
            "path_manager",
            "dns",
            "health",
        ],
        // The WireGuard gateway: a shell over `wg`, handed clients' packets by `overlay`.
        &["gateway"],
        &["control"],
        &["admin"],
        &["run"],
    ];

    /// Every source file and the module (layer name) it belongs to.
    const FILES: &[(&str, &str)] = &[
        ("view", include_str!("view.rs")),
        ("clock", include_str!("clock.rs")),
        ("reason", include_str!("reason.rs")),
        ("authz", include_str!("authz.rs")),
        ("config", include_str!("config.rs")),
        ("config", include_str!("config/http.rs")),
        ("store", include_str!("store.rs")),
        ("frame", include_str!("frame.rs")),
        ("traffic", include_str!("traffic.rs")),
        ("metrics", include_str!("metrics.rs")),
        ("telemetry", include_str!("telemetry.rs")),
        ("tls", include_str!("tls.rs")),
        ("tls", include_str!("tls/kx.rs")),
        ("registry", include_str!("registry.rs")),
        ("flow", include_str!("flow.rs")),
        ("path", include_str!("path/mod.rs")),
        ("path", include_str!("path/socket.rs")),
        ("path", include_str!("path/punch.rs")),
        ("path", include_str!("path/relay_out.rs")),
        ("path", include_str!("path/probe.rs")),
        ("path", include_str!("path/decide.rs")),
        ("state", include_str!("state.rs")),
        ("tunnel", include_str!("tunnel.rs")),
        ("proxy", include_str!("proxy.rs")),
        ("l7", include_str!("l7/mod.rs")),
        ("l7", include_str!("l7/ingress.rs")),
        ("l7", include_str!("l7/io.rs")),
        ("l7", include_str!("l7/framed.rs")),
        ("l7", include_str!("l7/replay.rs")),
        ("local_http", include_str!("local_http.rs")),
        ("wg", include_str!("wg.rs")),
        ("l7_egress", include_str!("l7/egress.rs")),
        ("overlay", include_str!("overlay/mod.rs")),
        ("overlay", include_str!("overlay/firewall.rs")),
        ("overlay", include_str!("overlay/buffers.rs")),
        ("overlay", include_str!("overlay/firewall/fragments.rs")),
        ("path_manager", include_str!("path/manager.rs")),
        ("dns", include_str!("dns.rs")),
        ("health", include_str!("health.rs")),
        ("gateway", include_str!("gateway.rs")),
        ("gateway", include_str!("gateway/handshakes.rs")),
        ("control", include_str!("control.rs")),
        ("admin", include_str!("admin.rs")),
        ("admin", include_str!("admin/http.rs")),
        ("run", include_str!("run.rs")),
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&module))
    }

    /// The modules `text` names after `crate::`.
    fn uses(text: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let mut out = Vec::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                out.extend(list[..end].split(',').map(ident));
            } else {
                out.push(ident(rest));
            }
        }
        out
    }

    #[test]
    fn no_module_reaches_up_the_layers() {
        let mut bad = Vec::new();
        for (module, text) in FILES {
            let mine = layer(module).expect("listed module");
            for name in uses(text) {
                if let Some(theirs) = layer(&name) {
                    if theirs > mine {
                        bad.push(format!("{module} uses crate::{name}"));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "layer order broken: {bad:?}");
    }

    #[test]
    fn every_source_file_is_checked() {
        let listed = FILES.len();
        let on_disk = walk(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
            .into_iter()
            .filter(|p| {
                // Test-only files and the binary's entry point are not layered.
                let s = p.to_string_lossy();
                !s.ends_with("lib.rs") && !s.ends_with("main.rs") && !s.ends_with("tests.rs")
            })
            .count();
        assert_eq!(listed, on_disk, "a source file is missing from FILES");
    }

    fn walk(dir: std::path::PathBuf) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(p));
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
        out
    }
}
