//! Every configuration decoder and name validator of im-infra on arbitrary
//! bytes: none may panic (see `im_infra_integration_tests::decoding`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    im_infra_integration_tests::decoding::decode_untrusted(data);
});
