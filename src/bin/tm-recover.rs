//! `tm-recover`: the operator tool (work in progress).
fn main() {}
