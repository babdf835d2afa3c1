//! Stateright's web explorer on tm's commit + recovery model (the one
//! `tests/model_check.rs` checks), to step through interleavings by hand:
//!
//! ```text
//! cargo run -p tm-core --example model_explorer --release              # 127.0.0.1:3000
//! TM_MODEL_SERVE=127.0.0.1:4000 TM_MODEL_FOREIGN=1 cargo run -p tm-core --example model_explorer --release
//! ```
//!
//! It runs until killed. `TM_MODEL_FOREIGN=1` explores the configuration in
//! which the second coordinator logs to a log of its own.

#[allow(dead_code)]
#[path = "../tests/support/protocol.rs"]
mod protocol;

use stateright::Model;

fn main() {
    let address = std::env::var("TM_MODEL_SERVE").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let wanted = if std::env::var_os("TM_MODEL_FOREIGN").is_some() {
        "foreign log"
    } else {
        "shared log"
    };
    let Some((_, config)) = protocol::Config::for_new_rules()
        .into_iter()
        .find(|(name, _)| *name == wanted)
    else {
        eprintln!("no configuration named {wanted:?}");
        std::process::exit(2);
    };
    println!("stateright explorer for the {wanted} configuration on http://{address}");
    config.checker().serve(address);
}
