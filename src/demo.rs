//! `livemirror demo` (written with the mirror engine work).
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {}

pub fn run(_a: DemoArgs) -> u8 {
    eprintln!("livemirror: demo is not available yet");
    1
}
