//! One zstd decompression context per thread, shared by the formats and
//! reused across blocks (creating one costs more than decoding a block).

use std::cell::RefCell;

use zstd::zstd_safe::{self, DCtx, DParameter, ResetDirective};

thread_local! {
    static CTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

fn name(code: usize) -> String {
    zstd_safe::get_error_name(code).to_string()
}

/// Runs `f` with this thread's context, reset, accepting windows up to
/// `2^window_log_max` bytes (bounding what a hostile frame can make the
/// decoder allocate). After an error the context is dropped, so no
/// half-decoded frame leaks into the next block.
pub fn with_dctx<R>(window_log_max: u32, f: impl FnOnce(&mut DCtx<'static>) -> Result<R, String>) -> Result<R, String> {
    CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(DCtx::try_create().ok_or("cannot create a zstd context")?);
        }
        let ctx = slot.as_mut().expect("just created");
        ctx.reset(ResetDirective::SessionAndParameters).map_err(name)?;
        ctx.set_parameter(DParameter::WindowLogMax(window_log_max)).map_err(name)?;
        let result = f(ctx);
        if result.is_err() {
            *slot = None;
        }
        result
    })
}

/// The message for a zstd error code.
pub fn error_name(code: usize) -> String {
    name(code)
}
