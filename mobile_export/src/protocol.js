// The names the protocol's two sides share (docs/protocol.md): the step routes, the header
// that carries a step's number, and the refusal codes the session recovers from. The
// JavaScript twin of splitkeras/protocol.py (tests/test_protocol.py checks they agree).
//
// A step's URL does not change from step to step (POST /v1/sessions/{id}/forward): its number
// travels in the Splitkeras-Step header, so that a browser caches one CORS preflight per route
// of a session instead of paying one before every request.

export const STEP_HEADER = 'Splitkeras-Step';
export const MAX_STEP = 2 ** 53;
export const STEP_ROUTES = ['forward', 'backward', 'train'];
export const TENSOR_ROUTES = [...STEP_ROUTES, 'predict'];
export const UNKNOWN_SESSION = 'unknown_session';
export const STEP_OUT_OF_ORDER = 'step_out_of_order';
// A forward while the server holds max_pending_steps steps of the session (pipelining).
export const PIPELINE_FULL = 'pipeline_full';
// The refusals of a backward whose forward the server no longer holds: resend the forward.
export const LOST_FORWARD_CODES = ['forward_lost', 'step_expired', 'step_out_of_order'];

/** The path of a session's tensor route: `/v1/sessions/{id}/{route}`. */
export function stepPath(sessionId, route) {
  if (!TENSOR_ROUTES.includes(route)) {
    throw new TypeError(`route must be one of ${TENSOR_ROUTES.join(', ')}, got ${route}`);
  }
  return `/v1/sessions/${sessionId}/${route}`;
}
