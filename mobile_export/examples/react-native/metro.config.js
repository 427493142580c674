// Metro for the example app: bundle the TF.js weight shards (.bin) as assets.
const { getDefaultConfig } = require('expo/metro-config');

const config = getDefaultConfig(__dirname);
config.resolver.assetExts.push('bin');
// React Native < 0.79: let Metro read the package `exports` (splitkeras-device's "react-native"
// condition); its "react-native" field points at the same file either way.
config.resolver.unstable_enablePackageExports = true;
module.exports = config;
